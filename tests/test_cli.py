"""The ``visionserve`` command as a user runs it: real processes, real model."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from visionserve.cli import os_error_line
from visionserve.store.catalog import get_entry
from visionserve.store.labels import COCO_80

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, model_dir: Path, mirror: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "VISIONSERVE_MODEL_DIR": str(model_dir),
        "VISIONSERVE_MODEL_MIRROR": str(mirror),
        "PYTHONPATH": str(REPO / "src"),
        "COLUMNS": "200",  # tables as wide as their rows
    }
    return subprocess.run([sys.executable, "-m", "visionserve", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_version_and_help(model_dir, mirror):
    r = run("--version", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0 and r.stdout.startswith("visionserve ")
    r = run("--help", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0 and all(c in r.stdout for c in ("serve", "detect", "models"))
    # Text in brackets in the help reaches the reader (the terminal's markup took it for tags).
    serve = run("serve", "--help", model_dir=model_dir, mirror=mirror).stdout
    assert "[env VISIONSERVE_MODEL_DIR]" in serve and "[env VISIONSERVE_MODEL_MIRROR]" in serve
    assert "[default: (9130)]" in serve
    optimize = run("models", "optimize", "--help", model_dir=model_dir, mirror=mirror).stdout
    assert "[[models]] name = NAME" in optimize and "[default: (the calibration images)]" in optimize


def test_detect_one_file_jsonl(model_dir, mirror, images):
    r = run("detect", str(images / "dog.jpg"), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    record = json.loads(line)
    assert record["file"].endswith("dog.jpg") and record["image"] == {"width": 768, "height": 576, "orientation": 1}
    assert {"dog", "bicycle", "car"} <= {d["label"] for d in record["detections"]}
    # The server's stages, but for the queue it does not have.
    assert list(record["timings_ms"]) == ["decode", "preprocess", "inference", "postprocess"]
    assert all(v > 0 for v in record["timings_ms"].values())


def test_detect_folder_csv_and_annotate(model_dir, mirror, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("dog.jpg", "person.jpg", "scream.jpg"):
        shutil.copy(images / name, folder / name)
    (folder / "notes.txt").write_text("not an image, skipped by suffix")
    out = tmp_path / "out"
    r = run("detect", str(folder), "--format", "csv", "--annotate", str(out), "--min-confidence", "0.5",
            model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    by_file = {}
    for row in rows:
        by_file.setdefault(Path(row["file"]).name, set()).add(row["label"])
    assert by_file["dog.jpg"] >= {"dog", "bicycle", "car"}
    assert by_file["person.jpg"] >= {"person", "dog", "horse"}
    assert "scream.jpg" not in by_file
    assert sorted(p.name for p in out.iterdir()) == ["dog.jpg", "person.jpg", "scream.jpg"]
    assert Image.open(out / "dog.jpg").size == (768, 576)


def test_detect_reports_bad_files_and_exits_1(model_dir, mirror, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    (empty := tmp_path / "empty.jpg").write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    r = run("detect", str(images / "dog.jpg"), str(bad), str(empty), str(missing), "--classes", "dog",
            model_dir=model_dir, mirror=mirror)
    assert r.returncode == 1
    good, broken, nothing, absent = (json.loads(line) for line in r.stdout.splitlines())
    assert [d["label"] for d in good["detections"]] == ["dog"]
    assert broken["error"]["code"] == "invalid_image"
    assert nothing["error"] == {"code": "missing_image", "message": "the file is empty"}
    # Not the image's fault: a file it cannot read is not an invalid image.
    assert absent["error"] == {"code": "input_error", "message": f"cannot read {missing}: No such file or directory"}


def test_models_list_pull_verify(mirror, tmp_path):
    store = tmp_path / "store"
    r = run("models", "list", model_dir=store, mirror=mirror)
    assert r.returncode == 0 and "yolox-nano" in r.stdout and "tiny-yolov2-voc" in r.stdout
    listed = {m["name"]: m for m in json.loads(run("models", "list", "--json", model_dir=store, mirror=mirror).stdout)["models"]}
    assert listed["yolox-nano"]["installed"] is False and listed["yolox-nano"]["classes"] == 80
    r = run("models", "pull", "yolox-nano", model_dir=store, mirror=mirror)
    assert r.returncode == 0, r.stderr
    assert (store / "yolox-nano" / "yolox_nano.onnx").is_file()
    listed = {m["name"]: m for m in json.loads(run("models", "list", "--json", model_dir=store, mirror=mirror).stdout)["models"]}
    assert listed["yolox-nano"]["installed"] is True and listed["tiny-yolov2-voc"]["installed"] is False
    r = run("models", "verify", model_dir=store, mirror=mirror)
    assert r.returncode == 0 and "ok" in r.stdout and "yolox_nano.onnx" in r.stdout
    (store / "yolox-nano" / "yolox_nano.onnx").write_bytes(b"tampered")
    r = run("models", "verify", "yolox-nano", model_dir=store, mirror=mirror)
    assert r.returncode == 1 and "FAIL" in r.stdout
    # One line per file for grep and scripts, however narrow the terminal it thinks it has.
    narrow = subprocess.run(
        [sys.executable, "-m", "visionserve", "models", "verify", "yolox-nano"], capture_output=True, text=True,
        env={**os.environ, "VISIONSERVE_MODEL_DIR": str(store), "PYTHONPATH": str(REPO / "src"), "COLUMNS": "40"},
        timeout=60,
    )
    assert narrow.stdout.splitlines() == [
        f"FAIL yolox-nano/yolox_nano.onnx: sha256 {hashlib.sha256(b'tampered').hexdigest()} != "
        f"{get_entry('yolox-nano').files[0].sha256}"
    ], narrow.stdout
    # A store path that is a file: said, not shown as an empty store.
    for command in (("models", "list"), ("models", "verify")):
        r = run(*command, model_dir=store / "yolox-nano" / "yolox_nano.onnx", mirror=mirror)
        assert r.returncode == 2 and "is a file, not a folder" in r.stderr, (command, r.stderr)
    r = run("models", "pull", "no-such-model", model_dir=store, mirror=mirror)
    assert r.returncode == 1 and "no-such-model" in r.stderr


def test_tiny_yolov2_pull_fails_clearly_offline(tmp_path, mirror):
    """Its file is not in the mirror here and the internet is unreachable: a clear error, no partial install."""
    store = tmp_path / "store"
    r = run("models", "pull", "tiny-yolov2-voc", model_dir=store, mirror=mirror, timeout=180)
    assert r.returncode == 1 and "tinyyolov2-8.onnx" in r.stderr
    assert not (store / "tiny-yolov2-voc" / "manifest.json").exists()


def test_bad_config_fails_at_start_naming_the_key(model_dir, mirror, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[limits]\nmax_body_bites = 3\n")
    r = run("serve", "--config", str(cfg), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 2 and "limits.max_body_bites" in r.stderr


def test_port_in_use_fails_at_once_before_any_model_work(tmp_path):
    """A busy port is reported in one line, before a model is pulled: this store is empty and
    this mirror has nothing, so any model work first would fail on the pull instead."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("serve", "--port", str(port), model_dir=tmp_path / "empty", mirror=tmp_path / "nothing", timeout=60)
    assert r.returncode == 3
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "yolox-nano" not in r.stderr and not (tmp_path / "empty").exists()
    r = run("serve", "--host", "nohost.invalid", model_dir=tmp_path / "empty", mirror=tmp_path / "nothing", timeout=60)
    assert r.returncode == 3 and "error: cannot listen on nohost.invalid:9130" in r.stderr


def test_config_file_from_env(model_dir, mirror, tmp_path, monkeypatch):
    """Containers point at a mounted TOML file with VISIONSERVE_CONFIG instead of --config."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[limits]\nmax_body_bites = 3\n")
    monkeypatch.setenv("VISIONSERVE_CONFIG", str(cfg))
    r = run("models", "list", model_dir=model_dir, mirror=mirror, timeout=60)
    assert r.returncode == 2 and "limits.max_body_bites" in r.stderr and str(cfg) in r.stderr


def test_models_optimize_reports_and_installs_only_what_qualifies(model_dir, mirror, images, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for name in ("dog.jpg", "person.jpg"):
        shutil.copy(images / name, calib / name)
    store = tmp_path / "store"
    shutil.copytree(model_dir / "yolox-nano", store / "yolox-nano")
    r = run("models", "optimize", "yolox-nano", "--calibration", str(calib), "--seconds", "0.3",
            "--min-agreement", "0.0", "--min-speedup", "0.0", "--json", model_dir=store, mirror=mirror, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # stdout holds the report alone
    names = [c["name"] for c in report["candidates"]]
    # every recipe: OpenVINO is installed with the test extras (its bf16 one where the CPU has bf16)
    import openvino

    bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert names == ["int8", "int8-mixed", "openvino", *(["openvino-bf16"] if bf16 else []), "openvino-int8"]
    assert report["float_throughput"] > 0
    # with the bars at zero, the fastest candidate is installed as a version of the model
    assert report["installed"] and report["installed"].startswith("yolox-nano@")
    assert (store / report["installed"] / "manifest.json").is_file()
    # `models list` shows the new version beside the model, with the engine that runs it
    r = run("models", "list", "--json", model_dir=store, mirror=mirror)
    rows = {m["name"]: m for m in json.loads(r.stdout)["models"]}
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert rows[report["installed"]]["installed"] and rows[report["installed"]]["backend"] == chosen["backend"]
    assert rows["yolox-nano"]["installed"] and rows["yolox-nano"]["backend"] == "onnxruntime"
    table = run("models", "list", model_dir=store, mirror=mirror).stdout
    assert "engine" in table
    (row,) = [line for line in table.splitlines() if f" {report['installed']} " in line]
    assert f" {chosen['backend']} " in row
    # detect takes the name optimize gave it (it was refused as not a model name)
    r = run("detect", "-m", report["installed"], str(images / "dog.jpg"), model_dir=store, mirror=mirror)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["model"] == {"name": "yolox-nano", "version": report["installed"].split("@")[1]}


def test_models_optimize_tries_the_recipes_named(model_dir, mirror, images, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(model_dir / "yolox-nano", store / "yolox-nano")
    r = run("models", "optimize", "yolox-nano", "--calibration", str(images / "dog.jpg"), "--seconds", "0.2",
            "--recipe", "openvino", "--recipe", "int8", "--min-speedup", "9", "--json",
            model_dir=store, mirror=mirror, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [(c["name"], c["backend"]) for c in report["candidates"]] == [("openvino", "openvino"), ("int8", "onnxruntime")]
    assert report["installed"] is None  # nothing is 9x faster


def test_models_optimize_argument_mistakes_are_reported_before_any_download(mirror, images, tmp_path):
    store = tmp_path / "empty-store"
    r = run("models", "optimize", "yolox-nano", "--calibration", str(images / "dog.jpg"), "--recipe", "fp4",
            model_dir=store, mirror=mirror)
    assert r.returncode == 1 and "unknown recipe 'fp4'" in r.stderr and "openvino-bf16" in r.stderr
    # The help names every recipe (it lists them by hand: the CLI does not import the optimizer to start).
    from visionserve.optimize.recipes import RECIPES

    help_text = run("models", "optimize", "--help", model_dir=store, mirror=mirror).stdout
    assert all(name in help_text for name in RECIPES), help_text
    # Text in brackets survives the terminal's markup.
    r = run("models", "optimize", "yolox-nano", "--calibration", str(images / "dog.jpg"), "--output-version", "v[1]",
            model_dir=store, mirror=mirror)
    assert r.returncode == 1 and "invalid version name 'v[1]'" in r.stderr, r.stderr
    assert not store.exists() or not any(store.iterdir())  # nothing pulled


def test_detect_decodes_like_the_server(model_dir, mirror, images, tmp_path, server_factory):
    """A large JPEG (over twice the model input, so it decodes at reduced scale) gets the
    same detections from `visionserve detect` as from the server."""
    import httpx

    big = tmp_path / "kite-big.jpg"
    with Image.open(images / "kite.jpg") as im:
        im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC).save(big, quality=95)
    r = run("detect", str(big), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    offline = json.loads(r.stdout)
    srv = server_factory()
    served = httpx.post(srv.url + "/predict", files={"image": (big.name, big.read_bytes(), "image/jpeg")}, timeout=60).json()
    assert offline["image"] == served["image"] == {"width": 2704, "height": 1800, "orientation": 1}
    assert offline["detections"] and offline["detections"] == served["detections"]


def test_detect_model_named_in_the_config_keeps_its_settings_there(model_dir, mirror, images, tmp_path):
    """--model picks among the configured models; it does not swap the config's entry for
    the catalog's defaults (nor fail on a model the catalog does not have)."""
    onnx = model_dir / "yolox-nano" / "yolox_nano.onnx"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'default_model = "mine"\n'
        '[[models]]\nname = "yolox-nano"\nmin_confidence = 0.84\n'
        f'[[models]]\nname = "mine"\npath = "{onnx}"\nfamily = "yolox"\nlabels = "{tmp_path / "coco.names"}"\n'
    )
    (tmp_path / "coco.names").write_text("\n".join(COCO_80) + "\n")
    dog = str(images / "dog.jpg")
    r = run("detect", dog, "--config", str(cfg), "--model", "yolox-nano", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    assert [d["label"] for d in json.loads(r.stdout)["detections"]] == ["dog"]  # 0.855; bicycle 0.80 is under 0.84
    r = run("detect", dog, "--config", str(cfg), "--model", "mine", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["name"] == "mine"
    # A model the config does not list comes from the store, on its own defaults, even though
    # the config names another default.
    cfg.write_text('default_model = "mine"\n[[models]]\nname = "mine"\n'
                   f'path = "{onnx}"\nfamily = "yolox"\nlabels = "{tmp_path / "coco.names"}"\n')
    r = run("detect", dog, "--config", str(cfg), "--model", "yolox-nano", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    assert {"dog", "bicycle", "car"} <= {d["label"] for d in json.loads(r.stdout)["detections"]}


def test_annotate_keeps_the_folders_and_never_replaces_an_input(model_dir, mirror, images, tmp_path):
    folder = tmp_path / "in"
    for sub, name in (("s1", "dog.jpg"), ("s2", "person.jpg")):
        (folder / sub).mkdir(parents=True)
        shutil.copy(images / name, folder / sub / "x.jpg")
    out = tmp_path / "out"
    r = run("detect", str(folder), "--annotate", str(out), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["annotated"] for rec in records] == [str(out / "s1" / "x.jpg"), str(out / "s2" / "x.jpg")]
    assert Image.open(out / "s1" / "x.jpg").size == (768, 576) and Image.open(out / "s2" / "x.jpg").size == Image.open(images / "person.jpg").size
    # A big JPEG, which the model gets at reduced scale, is drawn at its own size.
    Image.open(images / "dog.jpg").resize((3072, 2304)).save(tmp_path / "big.jpg", quality=90)
    r = run("detect", str(tmp_path / "big.jpg"), "--annotate", str(tmp_path / "drawn"), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0 and Image.open(tmp_path / "drawn" / "big.jpg").size == (3072, 2304)

    before = (folder / "s1" / "x.jpg").read_bytes()
    r = run("detect", str(folder), "--annotate", str(folder), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 2 and "would replace the input" in r.stderr and not r.stdout
    assert (folder / "s1" / "x.jpg").read_bytes() == before
    shutil.copy(images / "dog.jpg", folder / "s1" / "x.png")
    r = run("detect", str(folder), "--annotate", str(tmp_path / "out2"), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 2 and "would both be drawn to" in " ".join(r.stderr.split())
    assert not (tmp_path / "out2").exists()


def test_classes_that_name_no_label_of_the_model_are_refused_once_up_front(model_dir, mirror, images):
    dog = str(images / "dog.jpg")
    r = run("detect", dog, dog, "--classes", "dog,unicorn", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 2 and not r.stdout
    assert r.stderr.count("unicorn") == 1 and "not among this model's labels" in r.stderr
    r = run("detect", dog, "--classes", " , ", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 2 and "--classes names no label" in r.stderr


def test_csv_names_each_image_that_failed_on_stderr(model_dir, mirror, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    r = run("detect", str(images / "dog.jpg"), str(bad), "--format", "csv", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 1
    assert f"error: {bad}: " in " ".join(r.stderr.split()) and "1 of 2 images could not be processed" in r.stderr


def test_broken_manifests_are_reported_not_raised(mirror, tmp_path, model_dir):
    store = tmp_path / "store"
    shutil.copytree(model_dir / "yolox-nano", store / "yolox-nano")
    (store / "junk").mkdir()
    (store / "junk" / "manifest.json").write_text("[]")
    r = run("models", "list", model_dir=store, mirror=mirror)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "junk: the manifest.json of 'junk' is broken: not a JSON object" in r.stderr and "yolox-nano" in r.stdout
    r = run("models", "verify", model_dir=store, mirror=mirror)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "FAIL junk/manifest.json" in r.stdout and "ok yolox-nano/yolox_nano.onnx" in r.stdout
    r = run("models", "verify", "[/x]", model_dir=store, mirror=mirror)  # printed as written, not as markup
    assert r.returncode == 1 and "FAIL [/x]/[/x]: not a model name" in r.stdout


def test_the_machines_errors_are_one_line_not_a_traceback(model_dir, mirror, images, tmp_path):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "visionserve", "detect", str(images / "dog.jpg")], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120,
                           env={**os.environ, "VISIONSERVE_MODEL_DIR": str(model_dir), "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 1 and r.stderr.strip() == "error: No space left on device"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run("models", "pull", "yolox-nano", model_dir=blocker / "store", mirror=mirror)
    assert r.returncode == 1 and r.stderr.strip() == f"error: Not a directory: {blocker / 'store' / 'yolox-nano'}"


def test_a_refused_access_names_the_user_to_give_it_to(mirror):
    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "/srv/models/x")) == (
        f"Permission denied: /srv/models/x (visionserve runs as uid {os.getuid()}: give that user access to it)")
    assert os_error_line(PermissionError(errno.EPERM, "Operation not permitted")) == "Operation not permitted"
    # The command as run: writable sysfs refuses new folders even to root (a container's
    # read-only /sys says "Read-only file system" instead, which names no user).
    try:
        os.mkdir("/sys/visionserve-store")
    except PermissionError:
        pass
    except OSError as e:
        pytest.skip(f"/sys here refuses with {e.strerror!r}, not a permission error")
    r = run("models", "pull", "yolox-nano", model_dir=Path("/sys/visionserve-store"), mirror=mirror)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: Operation not permitted: /sys/visionserve-store")
    assert r.stderr.strip().endswith(f"(visionserve runs as uid {os.getuid()}: give that user access to it)")


def test_an_import_may_not_take_a_catalog_models_name(model_dir, mirror, tmp_path):
    cfg, weights, names = (tmp_path / n for n in ("net.cfg", "net.weights", "net.names"))
    for f in (cfg, weights, names):
        f.write_text("x")
    installed = model_dir / "yolox-nano" / "manifest.json"
    before = installed.read_bytes()
    r = run("models", "import-darknet", str(cfg), str(weights), "--labels", str(names), "--name", "yolox-nano",
            model_dir=model_dir, mirror=mirror)
    assert r.returncode == 2 and "'yolox-nano' is a catalog model's name" in r.stderr
    assert installed.read_bytes() == before


def test_a_config_path_that_is_a_folder_is_named_as_such(model_dir, mirror, tmp_path):
    r = run("models", "list", "--config", str(tmp_path), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 2 and f"config file {tmp_path} is not a file" in " ".join(r.stderr.split())


def test_optimize_refuses_bad_inputs_before_any_work(model_dir, mirror, images, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(images / "dog.jpg", calib / "dog.jpg")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no images here")
    store = tmp_path / "store"
    shutil.copytree(model_dir / "yolox-nano", store / "yolox-nano")
    base = ["models", "optimize", "yolox-nano", "--calibration", str(calib), "--seconds", "0.2"]
    r = run(*base, "--eval", str(tmp_path / "notes"), model_dir=store, mirror=mirror)
    assert r.returncode == 2 and f"no images in {tmp_path / 'notes'}" in " ".join(r.stderr.split())
    r = run(*base, "--output-version", "1", model_dir=store, mirror=mirror)
    assert r.returncode == 1 and "version '1' is yolox-nano's own" in r.stderr
    (calib / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    r = run(*base, model_dir=store, mirror=mirror)
    assert r.returncode == 1 and f"calibration image {calib / 'broken.jpg'}: " in " ".join(r.stderr.split())
    assert sorted(p.name for p in store.iterdir()) == ["yolox-nano"]  # nothing installed


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_while_serve_starts_ends_it_at_once_and_quietly(model_dir, mirror, sig, code):
    """As PID 1 in a container, a signal with no handler is dropped: `docker stop` during the
    imports (or a model pull) waited its whole grace period. The handler is there from the
    command's first instant."""
    env = {**os.environ, "VISIONSERVE_MODEL_DIR": str(model_dir), "VISIONSERVE_MODEL_MIRROR": str(mirror),
           "PYTHONPATH": str(REPO / "src")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "visionserve", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.15)  # still importing
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "listening on" not in err  # it ended while starting, not by draining a started server


def test_healthcheck_finds_the_port_where_the_server_does(server, model_dir, mirror, tmp_path):
    port = server.url.rsplit(":", 1)[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"port = {port}\n")
    r = run("healthcheck", "--config", str(cfg), model_dir=model_dir, mirror=mirror, timeout=60)
    assert (r.returncode, r.stdout) == (0, "ready\n"), r.stderr
    free = free_port()
    cfg.write_text(f"port = {free}\n")
    r = run("healthcheck", "--config", str(cfg), model_dir=model_dir, mirror=mirror, timeout=60)
    assert r.returncode == 1 and r.stdout == f"unhealthy: no answer from http://127.0.0.1:{free} (ConnectError)\n"
    # An IPv6 host written as in a URL, with its brackets: the same address.
    cfg.write_text(f'host = "[::1]"\nport = {free}\n')
    r = run("healthcheck", "--config", str(cfg), model_dir=model_dir, mirror=mirror, timeout=60)
    assert r.returncode == 1 and r.stdout == f"unhealthy: no answer from http://[::1]:{free} (ConnectError)\n", r.stderr


@pytest.mark.parametrize(("args", "says"), [
    (("healthcheck", "--url", "http://[::1"), "--url 'http://[::1' is not a server's base URL"),
    (("healthcheck", "--url", "ftp://127.0.0.1:9"), "is not a server's base URL"),
    (("healthcheck", "--timeout", "inf"), "less than or equal to 3600"),
    (("models", "pull", "yolox-nano", "--mirror", "http://[::1"), "model_mirror: Value error, not a valid URL"),
    (("models", "pull", "yolox-nano", "--mirror", "gopher://x/"), "model_mirror"),
])
def test_bad_urls_and_timeouts_are_one_error_not_a_traceback(model_dir, mirror, tmp_path, args, says):
    r = run(*args, model_dir=tmp_path / "store", mirror=mirror, timeout=60)
    assert r.returncode == 2, r.stderr
    assert says in " ".join(r.stderr.split()) and "Traceback" not in r.stderr, r.stderr


def test_a_models_bad_option_is_one_line_naming_it(model_dir, mirror, images, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[models]]\nname = "yolox-nano"\noptions = {pad_value = "abc"}\n')
    r = run("detect", str(images / "dog.jpg"), "--config", str(cfg), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: model 'yolox-nano': options.pad_value: Input should be a valid integer, unable to parse string as an integer"
    ]


def test_a_folder_that_cannot_be_listed_is_named_and_the_exit_is_1(model_dir, mirror, images, tmp_path):
    """Path.rglob passes over a folder it cannot list without a word; detect says so."""
    (tmp_path / "imgs" / "ok").mkdir(parents=True)
    (tmp_path / "imgs" / "locked").mkdir()
    shutil.copy(images / "dog.jpg", tmp_path / "imgs" / "ok" / "dog.jpg")
    shutil.copy(images / "dog.jpg", tmp_path / "imgs" / "locked" / "dog.jpg")
    (tmp_path / "imgs" / "locked").chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads any folder: give up the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux)")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    env = {**os.environ, "VISIONSERVE_MODEL_DIR": str(model_dir), "VISIONSERVE_MODEL_MIRROR": str(mirror),
           "PYTHONPATH": str(REPO / "src")}
    detect = [*prefix, sys.executable, "-m", "visionserve", "detect"]
    ok, locked = tmp_path / "imgs" / "ok" / "dog.jpg", tmp_path / "imgs" / "locked"
    try:
        below = subprocess.run([*detect, str(tmp_path / "imgs")], capture_output=True, text=True, env=env, timeout=120)
        # Given itself: the same line, not a usage error that stops the other images.
        given = subprocess.run([*detect, str(locked), str(ok)], capture_output=True, text=True, env=env, timeout=120)
    finally:
        locked.chmod(0o755)
    for r in (below, given):
        assert r.returncode == 1, r.stderr
        assert [json.loads(line)["file"] for line in r.stdout.splitlines()] == [str(ok)]
        assert f"{locked}: cannot list this folder (Permission denied)" in r.stderr


def test_an_annotate_folder_that_cannot_take_drawings_fails_before_any_work(model_dir, mirror, images, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    r = run("detect", str(images / "dog.jpg"), "--annotate", str(taken), model_dir=model_dir, mirror=mirror)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.strip() == f"error: --annotate {taken}: not a folder"
    # Missing folders are made, as before.
    r = run("detect", str(images / "dog.jpg"), "--annotate", str(tmp_path / "new" / "sub"), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0 and (tmp_path / "new" / "sub" / "dog.jpg").is_file(), r.stderr


def test_verify_of_every_model_fails_on_one_whose_file_is_gone_and_refuses_paths(mirror, tmp_path):
    """A model whose file was deleted was left out of "every installed model" and the exit
    was 0; a path given as a name checked a folder outside the store."""
    store = tmp_path / "store"
    assert run("models", "pull", "yolox-nano", model_dir=store, mirror=mirror).returncode == 0
    (store / "yolox-nano" / "yolox_nano.onnx").unlink()
    r = run("models", "verify", model_dir=store, mirror=mirror)
    assert r.returncode == 1 and r.stdout.splitlines() == ["FAIL yolox-nano/yolox_nano.onnx: missing"], r.stdout
    r = run("models", "verify", "../store/yolox-nano", model_dir=store / "sub", mirror=mirror)
    assert r.returncode == 1 and "not a model name" in r.stdout, r.stdout


def test_pulling_several_models_tries_each_and_fails_at_the_end(mirror, tmp_path):
    store = tmp_path / "store"
    r = run("models", "pull", "no-such-model", "yolox-nano", model_dir=store, mirror=mirror)
    assert r.returncode == 1 and "no-such-model" in r.stderr and "yolox-nano: installed" in r.stderr, r.stderr
    assert (store / "yolox-nano" / "yolox_nano.onnx").is_file()


def test_a_model_the_engine_cannot_run_is_one_error_not_a_traceback(model_dir, mirror, images, tmp_path):
    """A graph that takes 1 channel, served as a YOLOX (3 channels): ONNX Runtime's own error
    at the warm-up reached the terminal as a traceback."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceSum", ["images"], ["sum"], keepdims=1),
        helper.make_node("Reshape", ["sum", "one"], ["scalar"]),
        helper.make_node("Expand", ["scalar", "shape"], ["output"]),  # [1, 84, 6]: fits a 64x64 YOLOX of 1 label
    ]
    graph = helper.make_graph(
        nodes, "gray", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 84, 6])],
        [helper.make_tensor("one", TensorProto.INT64, [3], [1, 1, 1]), helper.make_tensor("shape", TensorProto.INT64, [3], [1, 84, 6])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "gray.onnx")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[models]]\nname = "gray"\npath = "{tmp_path / "gray.onnx"}"\nfamily = "yolox"\nlabels = ["a"]\n')
    r = run("detect", "-c", str(cfg), "-m", "gray", str(images / "dog.jpg"), model_dir=model_dir, mirror=mirror)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error: unexpected InvalidArgument while loading model 'gray'" in r.stderr and "Expected: 1" in r.stderr
