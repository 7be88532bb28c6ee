"""The model catalog and local store: pulls from a mirror folder or URL, verification, atomic writes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from visionserve.errors import ModelError, ModelNotFound
from visionserve.store.catalog import CATALOG, get_entry
from visionserve.store.manifest import ModelManifest
from visionserve.store.store import ModelStore


def test_catalog_entries_are_complete():
    assert {"yolox-nano", "tiny-yolov2-voc"} <= set(CATALOG)
    for entry in CATALOG.values():
        assert entry.files and entry.labels and entry.input_width > 0
        for f in entry.files:
            assert f.url.startswith("https://")
            assert f.sha256 is None or len(f.sha256) == 64
            assert f.sha256 or f.size
    yolox = get_entry("yolox-nano")
    assert len(yolox.labels) == 80 and yolox.labels[16] == "dog"
    tiny = get_entry("tiny-yolov2-voc")
    assert tiny.files[0].sha256 == "583fb7fdc948435ceac9fa82efc7708701efe8382a859a3dd46526b155f5f2ae"
    assert len(tiny.labels) == 20 and tiny.family == "yolov2-region"
    with pytest.raises(ModelNotFound):
        get_entry("nope")


def test_pull_from_mirror_folder_and_verify(tmp_path, mirror):
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    manifest = store.pull("yolox-nano")
    assert manifest.path.is_file() and manifest.family == "yolox" and manifest.folder == tmp_path / "store" / "yolox-nano"
    assert hashlib.sha256(manifest.path.read_bytes()).hexdigest() == get_entry("yolox-nano").files[0].sha256
    assert [c.ok for c in store.verify("yolox-nano")] == [True]
    assert [m.name for m in store.installed()] == ["yolox-nano"]
    assert not list((tmp_path / "store").rglob("*.part"))  # no temporary files left behind
    # tampering is detected
    with manifest.path.open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    assert [c.ok for c in store.verify("yolox-nano")] == [False]
    # a forced pull repairs it
    store.pull("yolox-nano", force=True)
    assert [c.ok for c in store.verify("yolox-nano")] == [True]


@pytest.mark.parametrize("damage", ["changed", "truncated"])
def test_a_plain_pull_repairs_an_installed_model_whose_file_changed(tmp_path, mirror, damage):
    """`models pull` says "verified": an install altered since is re-hashed and fetched again."""
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    path = store.pull("yolox-nano").path
    if damage == "changed":
        with path.open("r+b") as f:
            f.seek(1000)
            f.write(b"\x00\x01\x02")
    else:
        path.write_bytes(path.read_bytes()[:1_000_000])
    assert [c.ok for c in store.verify("yolox-nano")] == [False]
    assert store.pull("yolox-nano").path == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == get_entry("yolox-nano").files[0].sha256
    # Intact, it is left as it is: the same file, not fetched again.
    inode = path.stat().st_ino
    store.pull("yolox-nano")
    assert path.stat().st_ino == inode


def test_a_model_whose_file_changed_since_its_install_is_not_loaded(tmp_path, mirror):
    """Loading checks the file against the sha256 it was installed with: a changed byte is a
    ModelError that says how to repair it, and a plain pull repairs it."""
    from visionserve.config import ModelConfig
    from visionserve.runtime.registry import manifest_for

    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    path = store.pull("yolox-nano").path
    assert manifest_for(ModelConfig(name="yolox-nano"), store).path == path
    with path.open("r+b") as f:
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelError, match="its file has changed since it was installed") as e:
        manifest_for(ModelConfig(name="yolox-nano"), store)
    assert "visionserve models pull yolox-nano" in e.value.message and str(tmp_path) not in e.value.message
    store.pull("yolox-nano")
    assert manifest_for(ModelConfig(name="yolox-nano"), store).path == path


def test_a_file_longer_than_the_catalog_says_is_cut_off_not_stored(tmp_path, mirror):
    root = fake_mirror(tmp_path, mirror, corrupt=False)
    with (root / "yolox_nano" / "yolox_nano.onnx").open("ab") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: a mirror file that would fill the disk
    store = ModelStore(tmp_path / "store", mirror=str(root))
    with pytest.raises(ModelError, match="could not get yolox_nano.onnx") as e:
        store.pull("yolox-nano")
    assert f"more than the {get_entry('yolox-nano').files[0].size} bytes the catalog gives" in e.value.detail
    assert not list((tmp_path / "store").rglob("*.part"))


def fake_mirror(tmp_path: Path, mirror: Path, corrupt: bool) -> Path:
    root = tmp_path / "mirror"
    shutil.copytree(mirror / "yolox_nano", root / "yolox_nano")
    if corrupt:
        target = root / "yolox_nano" / "yolox_nano.onnx"
        target.chmod(0o644)
        data = bytearray(target.read_bytes())
        data[5000] ^= 0xFF
        target.write_bytes(bytes(data))
    return root


def test_bad_hash_is_rejected_and_nothing_installed(tmp_path, mirror):
    store = ModelStore(tmp_path / "store", mirror=str(fake_mirror(tmp_path, mirror, corrupt=True)))
    with pytest.raises(ModelError, match="could not get yolox_nano.onnx for 'yolox-nano'") as e:
        store.pull("yolox-nano")
    assert "sha256 mismatch" in e.value.detail
    folder = tmp_path / "store" / "yolox-nano"
    assert store.manifest("yolox-nano") is None
    assert not folder.exists()  # made for the pull, and removed when nothing came of it


@pytest.fixture()
def http_mirror(mirror):
    """The mirror served over HTTP on loopback, as an air-gapped site's web mirror would be."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *a: None  # type: ignore[assignment]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_pull_from_mirror_url(tmp_path, http_mirror):
    store = ModelStore(tmp_path / "store", mirror=http_mirror + "/")
    manifest = store.pull("yolox-nano")
    assert [c.ok for c in store.verify("yolox-nano")] == [True]
    assert manifest.labels[0] == "person"


def test_unreachable_sources_give_a_clear_error(tmp_path):
    store = ModelStore(tmp_path / "store", mirror=str(tmp_path / "empty-mirror"))
    with pytest.raises(ModelError) as e:
        store.pull("yolox-nano")
    # The sources tried are for the log and the CLI (the message can reach HTTP clients).
    assert "empty-mirror/yolox_nano/yolox_nano.onnx" in e.value.detail and "github.com" in e.value.detail
    assert str(tmp_path) not in e.value.message


def test_ensure_pulls_catalog_models_but_not_unknown_names(tmp_path, mirror):
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    assert store.ensure("yolox-nano").name == "yolox-nano"
    with pytest.raises(ModelNotFound) as e:
        store.ensure("not-a-model")
    assert str(tmp_path) not in e.value.message  # it can reach HTTP clients


def test_manifest_round_trip(tmp_path):
    m = ModelManifest(name="x", family="yolox", file="x.onnx", labels=["a"], input_width=32, input_height=32)
    m.save(tmp_path)
    loaded = ModelManifest.load(tmp_path)
    assert loaded.model_dump() == m.model_dump() and loaded.path == tmp_path / "x.onnx"


def test_manifests_name_their_engine_only_when_it_is_not_onnx_runtime(tmp_path):
    # Older releases forbid unknown manifest keys: ONNX Runtime models keep the old form.
    m = ModelManifest(name="x", family="yolox", file="x.onnx", labels=["a"], input_width=32, input_height=32)
    m.save(tmp_path / "ort")
    assert not {"backend", "backend_options"} & json.loads((tmp_path / "ort" / "manifest.json").read_text()).keys()
    assert ModelManifest.load(tmp_path / "ort").backend == "onnxruntime"
    ov = m.model_copy(update={"backend": "openvino", "backend_options": {"INFERENCE_PRECISION_HINT": "bf16"}})
    ov.save(tmp_path / "ov")
    saved = json.loads((tmp_path / "ov" / "manifest.json").read_text())
    assert (saved["backend"], saved["backend_options"]) == ("openvino", {"INFERENCE_PRECISION_HINT": "bf16"})
    assert ModelManifest.load(tmp_path / "ov").model_dump() == ov.model_dump()
    # Engines take text; a hand-written number is read as its text.
    saved["backend_options"] = {"NUM_STREAMS": 2}
    (tmp_path / "ov" / "manifest.json").write_text(json.dumps(saved))
    assert ModelManifest.load(tmp_path / "ov").backend_options == {"NUM_STREAMS": "2"}


def test_add_version_names_the_file_by_version_and_replaces_the_previous_one(tmp_path):
    store = ModelStore(tmp_path / "store")
    base_folder = store.folder("x")
    base = ModelManifest(name="x", family="yolox", file="x.onnx", labels=["a"], input_width=32, input_height=32)
    (base_folder).mkdir(parents=True)
    (base_folder / "x.onnx").write_bytes(b"float graph")
    base.save(base_folder)
    base = store.manifest("x")
    first = tmp_path / "x.openvino-int8.onnx"  # a scratch name from the recipe that built it first
    first.write_bytes(b"int8 graph")
    installed = store.add_version(base, "int8", first)
    digest = hashlib.sha256(b"int8 graph").hexdigest()
    assert installed.path == store.folder("x@int8") / f"x.int8.{digest[:12]}.onnx"
    assert installed.path.read_bytes() == b"int8 graph" and installed.sha256 == digest
    again = tmp_path / "other.onnx"
    again.write_bytes(b"int8 graph, calibrated again")
    installed = store.add_version(base, "int8", again, backend="openvino")
    digest = hashlib.sha256(b"int8 graph, calibrated again").hexdigest()
    assert sorted(p.name for p in store.folder("x@int8").iterdir()) == ["manifest.json", f"x.int8.{digest[:12]}.onnx"]
    assert installed.path.read_bytes() == b"int8 graph, calibrated again" and installed.backend == "openvino"
    assert all(check.ok for check in store.verify("x@int8"))
    for bad in ("../up", "a/b", "", "-x", "x" * 65):
        with pytest.raises(ModelError, match="invalid version name"):
            store.add_version(base, bad, again)
    with pytest.raises(ModelError, match="version '1' is x's own"):
        store.add_version(base, "1", again)


def test_a_version_whose_manifest_cannot_be_written_leaves_the_installed_one_whole(tmp_path, monkeypatch):
    store = ModelStore(tmp_path / "store")
    base = ModelManifest(name="x", family="yolox", file="x.onnx", labels=["a"], input_width=32, input_height=32)
    store.folder("x").mkdir(parents=True)
    (store.folder("x") / "x.onnx").write_bytes(b"float graph")
    base.save(store.folder("x"))
    (tmp_path / "g1.onnx").write_bytes(b"first build")
    first = store.add_version(store.manifest("x"), "int8", tmp_path / "g1.onnx")
    (tmp_path / "g2.onnx").write_bytes(b"second build")

    def full_disk(self, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelManifest, "save", full_disk)
    with pytest.raises(OSError):
        store.add_version(store.manifest("x"), "int8", tmp_path / "g2.onnx")
    monkeypatch.undo()
    assert store.manifest("x@int8") == first and first.path.read_bytes() == b"first build"
    assert all(check.ok for check in store.verify("x@int8"))
    assert sorted(p.name for p in store.folder("x@int8").iterdir()) == ["manifest.json", first.path.name]


@pytest.mark.parametrize("text, problem", [
    ('{"name": "m", "family": ', "not valid JSON (Expecting value at line 1, column 25)"),
    ("[1, 2]", "not a JSON object"),
    ('{"name": "m", "file": "m.onnx", "labels": ["a"], "input_width": "wide", "input_height": 9}',
     "family: Field required; input_width: Input should be a valid integer"),
    (b"\xff\xfe", "not UTF-8 text"),
])
def test_a_broken_manifest_says_what_is_wrong_without_naming_server_files(tmp_path, text, problem):
    folder = tmp_path / "store" / "m"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelError) as e:
        store.manifest("m")
    assert e.value.message.startswith(f"the manifest.json of 'm' is broken: {problem}"), e.value.message
    assert str(tmp_path) not in e.value.message  # it can reach HTTP clients
    assert str(folder / "manifest.json") in e.value.detail  # the log and the CLI name the file


@pytest.mark.parametrize("manifest", ["{bad", '{"name": "yolox-nano"}'])
def test_a_plain_pull_repairs_a_broken_manifest_and_keeps_the_intact_file(tmp_path, mirror, manifest):
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    path = store.pull("yolox-nano").path
    inode = path.stat().st_ino
    (path.parent / "manifest.json").write_text(manifest)
    with pytest.raises(ModelError, match="is broken") as e:
        store.manifest("yolox-nano")
    assert "\n" not in e.value.message + e.value.detail  # one line each, for the CLI too
    assert store.pull("yolox-nano").path == path and store.manifest("yolox-nano") is not None
    assert path.stat().st_ino == inode  # the model file was intact: not fetched again


def test_installed_hands_broken_manifests_over_or_raises(tmp_path, mirror):
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    store.pull("yolox-nano")
    (tmp_path / "store" / "broken").mkdir()
    (tmp_path / "store" / "broken" / "manifest.json").write_text("{")
    with pytest.raises(ModelError, match="manifest.json of 'broken' is broken"):
        store.installed()
    broken: dict[str, str] = {}
    assert [m.name for m in store.installed(broken=lambda name, e: broken.update({name: e.message}))] == ["yolox-nano"]
    assert list(broken) == ["broken"] and "not valid JSON" in broken["broken"]


@pytest.fixture()
def with_unhashed_file(monkeypatch):
    """A catalog entry like yolox-nano's plus a file with no published sha256, only a size,
    that no source has (its URL refuses at once): as the darknet models' weights are."""
    from dataclasses import replace

    from visionserve.store import catalog
    from visionserve.store.catalog import CatalogFile

    extra = CatalogFile("extra.bin", "http://127.0.0.1:9/extra.bin", None, size=10)
    entry = replace(get_entry("yolox-nano"), name="unhashed", files=(*get_entry("yolox-nano").files, extra))
    monkeypatch.setitem(catalog.CATALOG, "unhashed", entry)
    return entry


def test_a_file_with_no_sha256_is_checked_by_its_size_and_kept_when_intact(tmp_path, mirror, with_unhashed_file):
    """It was said "present" whatever its length, and a pull fetched it again even when
    intact: a repair failed for want of a file that was there whole."""
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    folder = tmp_path / "store" / "unhashed"
    folder.mkdir(parents=True)
    (folder / "extra.bin").write_bytes(b"0123456789")
    manifest = store.pull("unhashed")  # only the ONNX file is fetched
    assert {(c.name, c.ok, c.detail) for c in store.verify("unhashed")} == {
        ("extra.bin", True, "size ok (no published sha256)"), ("yolox_nano.onnx", True, "sha256 ok"),
    }
    manifest.path.write_bytes(b"damaged")
    assert store.pull("unhashed").path == manifest.path  # repaired, the intact extra kept
    assert all(c.ok for c in store.verify("unhashed"))
    (folder / "extra.bin").write_bytes(b"0123")
    assert ("extra.bin", False, "size 4 != 10 bytes") in {(c.name, c.ok, c.detail) for c in store.verify("unhashed")}
    with pytest.raises(ModelError, match="could not get extra.bin"):
        store.pull("unhashed")


def test_verify_checks_a_model_file_outside_its_folder_and_one_that_is_gone(tmp_path, mirror):
    """A manifest may name an absolute file: it was not checked at all. A model whose file
    was deleted was not installed as far as verify knew, and went unreported."""
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    installed = store.pull("yolox-nano")
    outside = tmp_path / "elsewhere" / "mine.onnx"
    outside.parent.mkdir()
    shutil.copy(installed.path, outside)
    (tmp_path / "store" / "mine").mkdir()
    installed.model_copy(update={"name": "mine", "file": str(outside)}).save(tmp_path / "store" / "mine")
    assert [(c.name, c.ok) for c in store.verify("mine")] == [(str(outside), True)]
    outside.write_bytes(outside.read_bytes()[:10])
    assert [(c.name, c.ok) for c in store.verify("mine")] == [(str(outside), False)]
    installed.path.unlink()
    assert store.manifest("yolox-nano") is None and store.written() == ["mine", "yolox-nano"]
    assert [(c.name, c.ok, c.detail) for c in store.verify("yolox-nano")] == [("yolox_nano.onnx", False, "missing")]


def test_a_killed_pulls_temporary_file_is_removed_by_the_next_pull(tmp_path, mirror):
    store = ModelStore(tmp_path / "store", mirror=str(mirror))
    store.pull("yolox-nano").path.unlink()
    folder = tmp_path / "store" / "yolox-nano"
    stale, fresh = folder / ".yolox_nano.onnx.old1.part", folder / ".yolox_nano.onnx.new2.part"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")  # another pull's, under way
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    store.pull("yolox-nano")
    assert not stale.exists() and fresh.exists()


def test_an_unreadable_mirror_file_is_a_fetch_error_and_the_next_source_is_tried(tmp_path):
    """A read error escaped as a bare OSError naming no file, and the public URL was never
    tried. /proc/self/mem opens, then fails its first read (EIO), as a failing disk would."""
    from visionserve.store.catalog import CatalogFile
    from visionserve.store.fetch import FetchError, fetch

    root = tmp_path / "mirror" / "x"
    root.mkdir(parents=True)
    (root / "f.bin").symlink_to("/proc/self/mem")
    with pytest.raises(FetchError) as e:
        fetch(CatalogFile("f.bin", "http://127.0.0.1:9/f.bin", None, size=4), "x", tmp_path / "out" / "f.bin",
              str(tmp_path / "mirror"))
    assert f"{root / 'f.bin'}: cannot read it: Input/output error" in str(e.value)
    assert "http://127.0.0.1:9/f.bin: ConnectError" in str(e.value)  # tried next
    assert not list((tmp_path / "out").iterdir())  # nothing half-written


def test_a_file_url_mirror_may_be_percent_encoded(tmp_path, mirror):
    spaced = tmp_path / "a mirror"
    shutil.copytree(mirror / "yolox_nano", spaced / "yolox_nano")
    store = ModelStore(tmp_path / "store", mirror="file://" + str(spaced).replace(" ", "%20"))
    assert store.pull("yolox-nano").path.is_file()
