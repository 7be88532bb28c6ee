"""Darknet catalog entries: pulled through the model store (from a mirror) and imported on pull."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from visionserve.config import RuntimeSettings
from visionserve.darknet import import_darknet
from visionserve.darknet.weights import encode_header
from visionserve.families import get_family
from visionserve.store.catalog import CATALOG
from visionserve.store.fetch import FetchError, fetch
from visionserve.store.labels import VOC_20
from visionserve.store.manifest import ModelManifest
from visionserve.runtime.model import ServedModel
from visionserve.store.store import INSTALLERS, ModelStore
from visionserve.types import PredictParams, Thresholds



def detect(manifest: ModelManifest, image: Path, min_confidence: float = 0.25):
    family = get_family(manifest.family)(manifest)
    session = ort.InferenceSession(str(manifest.path), providers=["CPUExecutionProvider"])
    family.validate_outputs([o.shape for o in session.get_outputs()])
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    tensor, placement = family.preprocess(rgb)
    outputs = session.run(None, {session.get_inputs()[0].name: tensor[None]})
    return family.postprocess([o[0] for o in outputs], placement, rgb.shape[1::-1], Thresholds(min_confidence, 0.45, 100))


def test_catalog_entries():
    assert "darknet" in INSTALLERS
    fastest = CATALOG["yolo-fastest-xl-voc"]
    assert (fastest.format, fastest.family, fastest.folder) == ("darknet", "darknet-yolo", "yolo_fastest_xl_voc")
    assert all(f.sha256 for f in fastest.files)
    tiny = CATALOG["yolov2-tiny-voc"]
    assert (tiny.format, tiny.family, tiny.folder) == ("darknet", "yolov2-region", "darknet_cfg")
    weights = next(f for f in tiny.files if f.name.endswith(".weights"))
    assert (weights.sha256, weights.size) == (None, 63_471_556)


def test_catalog_hashes_match_the_mirror(mirror):
    for name in ("yolo-fastest-xl-voc", "yolov2-tiny-voc"):
        entry = CATALOG[name]
        for f in entry.files:
            path = mirror / entry.folder / f.name
            if f.sha256 is None:
                continue  # not in the mirror: only pjreddie.com has it
            assert hashlib.sha256(path.read_bytes()).hexdigest() == f.sha256, path
            assert f.size is None or path.stat().st_size == f.size


def test_pull_yolo_fastest_imports_and_detects(tmp_path, mirror, images):
    store = ModelStore(tmp_path / "models", mirror=str(mirror))
    manifest = store.pull("yolo-fastest-xl-voc")
    assert manifest.family == "darknet-yolo" and manifest.source == "catalog"
    assert manifest.labels == list(VOC_20)
    assert manifest.path == tmp_path / "models" / "yolo-fastest-xl-voc" / "yolo-fastest-xl-voc.onnx"
    assert all(check.ok for check in store.verify("yolo-fastest-xl-voc"))
    assert store.manifest("yolo-fastest-xl-voc") == manifest
    dets = detect(manifest, images / "dog.jpg", manifest.min_confidence)
    assert {"dog", "bicycle", "car"} <= set(dets.label_names())
    assert len(detect(manifest, images / "scream.jpg")) == 0
    # A second pull finds it installed.
    assert store.pull("yolo-fastest-xl-voc") == manifest
    # The conversion leaves the manifest to the store, which writes it once, complete: a pull
    # stopped in between must not leave the importer's defaults installed as if from the catalog.
    fresh = tmp_path / "fresh"
    shutil.copytree(tmp_path / "models" / "yolo-fastest-xl-voc", fresh)
    (fresh / "manifest.json").unlink()
    (fresh / "yolo-fastest-xl-voc.onnx").unlink()  # so that the check below shows the installer wrote it
    INSTALLERS["darknet"](CATALOG["yolo-fastest-xl-voc"], fresh)
    assert (fresh / "yolo-fastest-xl-voc.onnx").is_file() and not (fresh / "manifest.json").exists()

    # The runtime serves it like any other model, batches included.
    served = ServedModel(manifest, RuntimeSettings(intra_op_threads=1))
    served.load()
    rgb = cv2.cvtColor(cv2.imread(str(images / "dog.jpg")), cv2.COLOR_BGR2RGB)
    timings: dict[str, float] = {}
    dets = served.predict(rgb, served.thresholds(PredictParams()), timings)
    assert {"dog", "bicycle", "car"} <= set(dets.label_names())
    tensor, _ = served.family.preprocess(rgb)
    assert [o.shape for o in served.run(np.stack([tensor] * 3))] == [(3, 75, 10, 10), (3, 75, 20, 20)]


def test_pull_yolov2_tiny_from_a_mirror_with_weights(tmp_path, mirror, images):
    """The real weights are not on this machine: a mirror with random weights of the right size stands in."""
    fake = tmp_path / "mirror"
    (fake / "darknet_cfg").mkdir(parents=True)
    shutil.copy(mirror / "darknet_cfg" / "yolov2-tiny-voc.cfg", fake / "darknet_cfg")
    # Small positive values: every batch-norm variance is valid and activations stay finite.
    body = np.random.default_rng(0).uniform(0.001, 0.002, 15_867_885).astype("<f4")
    (fake / "darknet_cfg" / "yolov2-tiny-voc.weights").write_bytes(encode_header(0, 1, 0, 32_013_312) + body.tobytes())
    store = ModelStore(tmp_path / "models", mirror=str(fake))
    manifest = store.pull("yolov2-tiny-voc")
    assert manifest.family == "yolov2-region"
    assert (manifest.input_width, manifest.input_height) == (416, 416)
    assert manifest.options["anchors"] == [[1.08, 1.19], [3.42, 4.41], [6.63, 11.38], [9.42, 5.11], [16.62, 10.52]]
    assert manifest.options["scale"] == pytest.approx(1 / 255) and manifest.options["resize"] == "stretch"
    checks = {c.name: c for c in store.verify("yolov2-tiny-voc")}
    assert checks["yolov2-tiny-voc.weights"].ok and "no published sha256" in checks["yolov2-tiny-voc.weights"].detail
    assert checks["yolov2-tiny-voc.onnx"].ok
    detect(manifest, images / "dog.jpg")  # runs end to end


def test_pull_rejects_a_mirror_file_of_the_wrong_size(tmp_path, mirror):
    fake = tmp_path / "mirror"
    (fake / "darknet_cfg").mkdir(parents=True)
    shutil.copy(mirror / "darknet_cfg" / "yolov2-tiny-voc.cfg", fake / "darknet_cfg")
    (fake / "darknet_cfg" / "yolov2-tiny-voc.weights").write_bytes(b"\0" * 1000)
    entry = CATALOG["yolov2-tiny-voc"]
    weights = next(f for f in entry.files if f.name.endswith(".weights"))
    # The public URL is swapped for the fake mirror's copy: this machine has no internet.
    local = dataclasses.replace(weights, url=str(fake / "darknet_cfg" / weights.name))
    with pytest.raises(FetchError, match="size mismatch"):
        fetch(local, "darknet_cfg", tmp_path / "out.weights", None)
    assert not (tmp_path / "out.weights").exists()


LETTERBOX_CFG = """[net]
width=64
height=32
channels=3
letter_box=1

[convolutional]
filters=14
size=1
activation=linear

[region]
anchors=1,2, 3,4
classes=2
num=2
softmax=1
"""


def test_import_writes_onnx_and_manifest(tmp_path):
    cfg = tmp_path / "lb.cfg"
    cfg.write_text(LETTERBOX_CFG)
    weights = tmp_path / "lb.weights"
    weights.write_bytes(encode_header(0, 2, 0, 0) + np.ones(14 + 14 * 3, "<f4").tobytes())
    names = tmp_path / "lb.names"
    names.write_text("cat\n\ndog\n")
    manifest = import_darknet(cfg, weights, names, tmp_path / "out", "lb")
    assert manifest.family == "yolov2-region" and manifest.source == "darknet"
    assert manifest.labels == ["cat", "dog"]
    assert manifest.options == {
        "channel_order": "RGB", "scale": pytest.approx(1 / 255), "resize": "letterbox", "align": "center",
        "pad_value": 128, "anchors": [[1.0, 2.0], [3.0, 4.0]],
    }
    assert ModelManifest.load(tmp_path / "out") == manifest
    data = (tmp_path / "out" / "lb.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest.sha256
    model = onnx.load_from_string(data)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [dims(i) for i in model.graph.input] == [["N", 3, 32, 64]]
    assert [(o.name, dims(o)) for o in model.graph.output] == [("region", ["N", 14, 32, 64])]
    spec = get_family(manifest.family)(manifest).input
    assert (spec.resize, spec.align, spec.pad_value) == ("letterbox", "center", 128)
    # A 1x1 conv of all-ones weights and bias 1: every output is 1 + the sum of the 3 inputs.
    session = ort.InferenceSession(str(manifest.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (3, 3, 32, 64)).astype(np.float32)
    (out,) = session.run(None, {"input": x})
    np.testing.assert_allclose(out, np.broadcast_to(1 + x.sum(1, keepdims=True), (3, 14, 32, 64)), rtol=1e-6)
