"""Several models in one server: YOLOX-Nano beside a darknet model imported from cfg + weights."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, model_dir: Path, mirror: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISIONSERVE_MODEL_DIR": str(model_dir), "VISIONSERVE_MODEL_MIRROR": str(mirror),
           "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "visionserve", *args], capture_output=True, text=True, env=env,
                          timeout=180)


@pytest.fixture(scope="module")
def two_model_server(model_dir, mirror, tmp_path_factory):
    from conftest import start_server

    r = cli("models", "pull", "yolo-fastest-xl-voc", model_dir=model_dir, mirror=mirror)
    assert r.returncode == 0, r.stderr
    srv = start_server(model_dir, mirror, tmp_path_factory.mktemp("multi"),
                       "--model", "yolox-nano", "--model", "yolo-fastest-xl-voc")
    yield srv
    srv.stop()


def labels(r) -> set[str]:
    return {d["label"] for d in r.json()["detections"]}


def test_both_models_served_by_one_process(two_model_server, images):
    with two_model_server.client() as c:
        status = {m["name"]: m for m in c.get("/status").json()["models"]}
        assert status["yolox-nano"]["ready"] and status["yolox-nano"]["default"]
        assert status["yolo-fastest-xl-voc"]["ready"] and status["yolo-fastest-xl-voc"]["family"] == "darknet-yolo"
        dog = (images / "dog.jpg").read_bytes()
        voc = c.post("/predict/yolo-fastest-xl-voc", files={"image": ("dog.jpg", dog)})
        assert voc.status_code == 200 and voc.json()["model"]["name"] == "yolo-fastest-xl-voc"
        assert {"dog", "bicycle", "car"} <= labels(voc)
        coco = c.post("/predict", files={"image": ("dog.jpg", dog)})
        assert coco.json()["model"]["name"] == "yolox-nano" and {"dog", "bicycle", "car"} <= labels(coco)
        # VOC labels, not COCO's: person.jpg's horse is a "cow" or "horse" in VOC; "pottedplant" etc. exist
        person = c.post("/predict/yolo-fastest-xl-voc", files={"image": ("p.jpg", (images / "person.jpg").read_bytes())})
        assert "person" in labels(person) and "dog" in labels(person)
        r = c.post("/predict/yolo-fastest-xl-voc?classes=motorbike", files={"image": ("dog.jpg", dog)})
        assert r.status_code == 200  # a VOC label
        r = c.post("/predict/yolo-fastest-xl-voc?classes=motorcycle", files={"image": ("dog.jpg", dog)})
        assert r.status_code == 422  # COCO's spelling is not this model's


def test_per_model_default_thresholds(model_dir, mirror, server_factory, images, tmp_path):
    cli("models", "pull", "yolo-fastest-xl-voc", model_dir=model_dir, mirror=mirror)
    config = tmp_path / "c.toml"
    config.write_text('[[models]]\nname = "yolox-nano"\nmin_confidence = 0.82\n\n'
                      '[[models]]\nname = "yolo-fastest-xl-voc"\nmin_confidence = 0.2\n')
    srv = server_factory("--config", str(config))
    dog = (images / "dog.jpg").read_bytes()
    with srv.client() as c:
        assert [d["label"] for d in c.post("/predict", files={"image": ("d", dog)}).json()["detections"]] == ["dog"]
        voc = c.post("/predict/yolo-fastest-xl-voc", files={"image": ("d", dog)}).json()["detections"]
        scores = [d["confidence"] for d in voc]
        assert min(scores) >= 0.2 and sum(s < 0.3 for s in scores) >= 1  # PROVENANCE's weak second car (0.252) is in
        assert [d["label"] for d in voc].count("car") == 2


def test_import_darknet_then_serve_and_detect(mirror, images, tmp_path):
    store = tmp_path / "store"
    folder = mirror / "yolo_fastest_xl_voc"
    r = cli("models", "import-darknet", str(folder / "yolo-fastest-xl.cfg"), str(folder / "yolo-fastest-xl.weights"),
            "--labels", str(folder / "voc.names"), "--name", "my-fastest", model_dir=store, mirror=mirror)
    assert r.returncode == 0, r.stderr
    assert (store / "my-fastest" / "my-fastest.onnx").is_file()
    listed = json.loads(cli("models", "list", "--json", model_dir=store, mirror=mirror).stdout)["models"]
    assert any(m["name"] == "my-fastest" and m["installed"] and m["classes"] == 20 for m in listed)
    r = cli("detect", str(images / "dog.jpg"), "--model", "my-fastest", model_dir=store, mirror=mirror)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["model"]["name"] == "my-fastest" and {"dog", "bicycle", "car"} <= {d["label"] for d in record["detections"]}
    # Imported again under that name: refused (a version made from it would serve the old
    # graph), unless replaced on purpose, which names the versions to make again.
    again = ("models", "import-darknet", str(folder / "yolo-fastest-xl.cfg"), str(folder / "yolo-fastest-xl.weights"),
             "--labels", str(folder / "voc.names"), "--name", "my-fastest")
    r = cli(*again, model_dir=store, mirror=mirror)
    assert r.returncode == 2 and "'my-fastest' is installed already: --replace replaces it" in r.stderr, r.stderr
    shutil.copytree(store / "my-fastest", store / "my-fastest@int8")
    r = cli(*again, "--replace", model_dir=store, mirror=mirror)
    assert r.returncode == 0 and "make them again (visionserve models optimize my-fastest): my-fastest@int8" in r.stderr
    r = cli(*again[:-1], "../outside", model_dir=store, mirror=mirror)
    assert r.returncode == 2 and "'../outside' is not a model name" in r.stderr and not (tmp_path / "outside").exists()


def test_import_darknet_rejects_a_truncated_weights_file(mirror, tmp_path):
    folder = mirror / "yolo_fastest_xl_voc"
    short = tmp_path / "short.weights"
    short.write_bytes((folder / "yolo-fastest-xl.weights").read_bytes()[:-100])
    r = cli("models", "import-darknet", str(folder / "yolo-fastest-xl.cfg"), str(short),
            "--labels", str(folder / "voc.names"), model_dir=tmp_path / "store", mirror=mirror)
    assert r.returncode == 1 and "truncated" in r.stderr and "line" in r.stderr
    assert not (tmp_path / "store" / "yolo-fastest-xl" / "manifest.json").exists()


def test_own_onnx_file_from_config(server_factory, model_dir, images, tmp_path):
    """A user's own ONNX file + family + labels file, served beside the catalog model."""
    import shutil

    own = tmp_path / "my-detector.onnx"
    shutil.copy(model_dir / "yolox-nano" / "yolox_nano.onnx", own)
    names = tmp_path / "my.names"
    names.write_text("\n".join(f"thing{i}" for i in range(80)) + "\n")
    config = tmp_path / "c.toml"
    config.write_text(
        '[[models]]\nname = "yolox-nano"\n\n'
        f'[[models]]\nname = "mine"\npath = "{own}"\nfamily = "yolox"\nlabels = "{names}"\nversion = "7"\n'
    )
    srv = server_factory("--config", str(config))
    with srv.client() as c:
        status = {m["name"]: m for m in c.get("/status").json()["models"]}
        assert status["mine"]["ready"] and status["mine"]["input"] == {"width": 416, "height": 416, "padded_to_multiple_of": 32}  # read from the graph
        body = c.post("/predict/mine", files={"image": ("d.jpg", (images / "dog.jpg").read_bytes())}).json()
        assert body["model"] == {"name": "mine", "version": "7"}
        assert {d["label"] for d in body["detections"]} >= {"thing16", "thing1", "thing2"}  # dog, bicycle, car
