"""Reduced-precision versions of the real YOLOX-Nano: built, installed in the store as
``yolox-nano@<version>``, loadable by the server's model object, and close to the float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from visionserve.config import ModelConfig, RuntimeSettings
from visionserve.errors import ModelError
from visionserve.imaging.decode import decode_image
from visionserve.optimize import optimize_model
from visionserve.optimize.graph import depthwise_convs, head_nodes, stem_convs
from visionserve.optimize.measure import agreement, match_count
from visionserve.runtime.model import ServedModel
from visionserve.runtime.registry import manifest_for
from visionserve.store.store import ModelStore
from visionserve.types import Detections, PredictParams
from visionserve.vision.boxes import box_iou

LABELS = ["person", "bicycle", "car", "dog"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("optimize-models"), mirror=str(mirror))
    store.pull("yolox-nano")
    return store


@pytest.fixture(scope="module")
def report(store: ModelStore, images: Path):
    # Few calibration images and short measurements keep this test quick; the thresholds
    # are zero so that the candidate is installed whatever this machine's timing says.
    return optimize_model(
        store,
        "yolox-nano",
        [images / "dog.jpg", images / "person.jpg"],
        [images / "dog.jpg", images / "horses.jpg"],
        output_version="int8",
        recipes=["int8-mixed"],
        min_agreement=0.0,
        min_speedup=0.0,
        seconds=0.2,
        rounds=1,
    )


def detect(model: ServedModel, path: Path) -> Detections:
    image = decode_image(path.read_bytes())
    return model.predict(image.pixels, model.thresholds(PredictParams()), {})


def test_quantized_version_is_installed_beside_the_float_model(store: ModelStore, report) -> None:
    assert report.installed == "yolox-nano@int8"
    manifest = store.manifest("yolox-nano@int8")
    assert manifest is not None
    assert (manifest.name, manifest.version, manifest.family) == ("yolox-nano", "int8", "yolox")
    assert manifest.source == "derived:yolox-nano@1"
    # Named by the version it is (int8), not by the recipe that built it (int8-mixed).
    assert manifest.path == store.folder("yolox-nano@int8") / f"yolox_nano.int8.{manifest.sha256[:12]}.onnx"
    assert manifest.path.stat().st_size < store.manifest("yolox-nano").path.stat().st_size  # 8-bit weights
    assert all(check.ok for check in store.verify("yolox-nano@int8"))
    # The float model is untouched and both are listed.
    assert store.manifest("yolox-nano").version == "1"
    assert sorted(m.version for m in store.installed()) == ["1", "int8"]


def test_quantized_model_serves_dog_bicycle_car_like_the_float_model(store: ModelStore, report, images: Path) -> None:
    served = {}
    for ref in ("yolox-nano", "yolox-nano@int8"):
        model = ServedModel(store.manifest(ref), RuntimeSettings(intra_op_threads=1))
        model.load()  # the server's checks: one input, outputs fit the family, warm-up run
        served[ref] = detect(model, images / "dog.jpg")
    float_dets, int8_dets = served["yolox-nano"], served["yolox-nano@int8"]
    for label in ("dog", "bicycle", "car"):
        ref_boxes = float_dets.boxes[np.array(float_dets.label_names()) == label]
        got_boxes = int8_dets.boxes[np.array(int8_dets.label_names()) == label]
        assert len(ref_boxes) and len(got_boxes), f"{label} missing: {int8_dets.label_names()}"
        assert box_iou(ref_boxes, got_boxes).max() >= 0.8, label


def test_report_figures_are_present_and_sane(report) -> None:
    assert report.model == "yolox-nano" and report.base_version == "1"
    assert report.cores >= 1 and report.workers == report.cores
    assert report.calibration_images == 2 and report.calibration_tensors == 8  # 4 variants each
    assert report.float_throughput > 0 and report.float_cpu_ms > 0 and report.float_latency_ms > 0
    (candidate,) = report.candidates
    assert candidate.name == "int8-mixed" and candidate.accepted and report.chosen == "int8-mixed"
    assert candidate.throughput > 0 and candidate.cpu_ms > 0 and candidate.latency_ms > 0
    assert candidate.speedup == pytest.approx(candidate.throughput / report.float_throughput)
    assert candidate.cpu_speedup == pytest.approx(report.float_cpu_ms / candidate.cpu_ms)
    # dog.jpg and horses.jpg: the float model finds 7 objects at the default thresholds.
    assert candidate.reference_detections >= 5
    assert 0 < candidate.matched <= candidate.reference_detections
    compared = max(candidate.reference_detections, candidate.candidate_detections)
    assert candidate.agreement == pytest.approx(candidate.matched / compared)
    assert f"agreement {candidate.matched}/{compared} " in report.summary()
    assert "int8-mixed" in report.summary() and "yolox-nano@int8" in report.summary()


def test_a_candidate_below_the_agreement_bar_is_not_installed(store: ModelStore, images: Path) -> None:
    result = optimize_model(
        store, "yolox-nano", [images / "dog.jpg"], output_version="strict",
        recipes=["int8"], min_agreement=1.01, min_speedup=0.0, augment=False, seconds=0.1, rounds=1,
    )
    assert result.installed is None and result.chosen is None
    assert not result.candidates[0].accepted
    assert result.candidates[0].reason.startswith("agreement")
    assert store.manifest("yolox-nano@strict") is None


def test_graph_parts_kept_float(store: ModelStore) -> None:
    model = onnx.load(str(store.manifest("yolox-nano").path))
    by_name = {n.name: n for n in model.graph.node}
    head = head_nodes(model)
    out_producer = next(n for n in model.graph.node if "output" in n.output)
    assert out_producer.name in head
    head_convs = {n for n in head if by_name[n].op_type == "Conv"}
    assert len(head_convs) == 9  # reg, obj, cls predictions at three strides
    depthwise = depthwise_convs(model)
    assert depthwise and all(by_name[n].op_type == "Conv" for n in depthwise)
    assert not depthwise & head
    (stem,) = stem_convs(model)
    assert by_name[stem].op_type == "Conv"


def _dets(boxes: list[list[float]], ids: list[int]) -> Detections:
    return Detections(
        np.array(boxes, np.float32).reshape(-1, 4), np.ones(len(ids), np.float32), np.array(ids, np.int32), LABELS
    )


def test_matching_is_per_label_and_one_to_one() -> None:
    ref = _dets([[0, 0, 100, 100], [0, 0, 100, 100], [200, 200, 300, 300]], [3, 3, 2])
    # One dog box for two reference dogs; the car is shifted (IoU 0.68) and a bicycle sits on it.
    got = _dets([[1, 1, 100, 100], [210, 210, 310, 310], [200, 200, 300, 300]], [3, 2, 1])
    assert match_count(ref, got, 0.8) == 1
    assert match_count(ref, got, 0.6) == 2
    assert match_count(ref, _dets([], []), 0.8) == 0
    a = agreement([ref, _dets([], [])], [got, _dets([], [])], 0.8)
    assert (a.matched, a.reference, a.candidate) == (1, 3, 3)
    assert a.fraction == pytest.approx(1 / 3)
    # Extra detections count against a candidate as missed ones do; nothing at all is no evidence.
    extra = _dets([[0, 0, 100, 100], [200, 200, 300, 300], [400, 400, 500, 500]], [3, 2, 1])
    assert agreement([_dets([[0, 0, 100, 100]], [3])], [extra]).fraction == pytest.approx(1 / 3)
    assert agreement([_dets([], [])], [got]).fraction == 0.0
    assert agreement([_dets([], [])], [_dets([], [])]).fraction == 0.0


def test_images_the_float_model_finds_nothing_in_are_refused_as_evidence(store: ModelStore, tmp_path: Path) -> None:
    """Agreement 0/0 was 100%: a version was installed on no evidence at all."""
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (320, 240), (127, 127, 127)).save(blank)
    with pytest.raises(ModelError, match="the float model finds nothing in the evaluation images"):
        optimize_model(store, "yolox-nano", [blank], [blank], recipes=["int8"], seconds=0.1, rounds=1)


def test_a_version_is_not_a_base_to_optimize(store: ModelStore, images: Path) -> None:
    """From yolox-nano@int8, --output-version 1 took the base model's own version."""
    with pytest.raises(ModelError, match="optimize starts from the model itself: give 'yolox-nano'"):
        optimize_model(store, "yolox-nano@int8", [images / "dog.jpg"], output_version="1", recipes=["int8"])


def test_server_serves_the_installed_version_under_the_model_name(
    store: ModelStore, report, mirror: Path, images: Path, tmp_path: Path
) -> None:
    from conftest import start_server

    config = tmp_path / "versions.toml"
    config.write_text('[[models]]\nname = "yolox-nano"\nversion = "int8"\n')
    server = start_server(store.root, mirror, tmp_path, "--config", str(config))
    try:
        with server.client() as c:
            r = c.post("/predict", files={"image": ("dog.jpg", (images / "dog.jpg").read_bytes())})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "yolox-nano" and body["model"]["version"] == "int8"
    assert {"dog", "bicycle", "car"} <= {d["label"] for d in body["detections"]}
    # The scores are the quantized graph's, not the float model's relabelled.
    served = sorted(d["confidence"] for d in body["detections"])
    expected = {}
    for ref in ("yolox-nano", "yolox-nano@int8"):
        model = ServedModel(store.manifest(ref), RuntimeSettings(intra_op_threads=1))
        model.load()
        expected[ref] = sorted(detect(model, images / "dog.jpg").scores.tolist())
    assert served == pytest.approx(expected["yolox-nano@int8"], abs=1e-4)
    assert served != pytest.approx(expected["yolox-nano"], abs=1e-4)


def test_a_configured_version_that_is_not_installed_fails_instead_of_serving_the_base_model(
    store: ModelStore, report
) -> None:
    base = store.manifest("yolox-nano")
    with pytest.raises(ModelError, match=r"yolox-nano@openvino-int8 is not installed"):
        manifest_for(ModelConfig(name="yolox-nano", version="openvino-int8"), store)
    # The base model's own version, and an installed one, resolve as before.
    assert manifest_for(ModelConfig(name="yolox-nano", version=base.version), store).path == base.path
    assert manifest_for(ModelConfig(name="yolox-nano", version="int8"), store).path == store.manifest("yolox-nano@int8").path


def test_a_version_that_could_not_be_installed_is_refused_before_any_work(store: ModelStore, images: Path) -> None:
    """A file where the version's folder goes: the error came after the build and the measurements."""
    blocked = store.folder("yolox-nano@blocked")
    blocked.write_text("not a folder")
    try:
        with pytest.raises(ModelError, match="cannot install 'yolox-nano@blocked': something other than a folder"):
            optimize_model(store, "yolox-nano", [images / "dog.jpg"], output_version="blocked", recipes=["int8"])
    finally:
        blocked.unlink()
