"""OpenVINO, the optional engine: a model version whose manifest says ``backend = "openvino"``
runs the same ONNX file through OpenVINO, in the server's own model object and over HTTP,
and ``optimize_model`` measures and installs such versions like the INT8 ones."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from engine_helpers import children, mapped_libraries, post_image
from visionserve.errors import ModelError
from visionserve.imaging.decode import decode_image
from visionserve.optimize import optimize_model
from visionserve.optimize.recipes import RECIPES, Recipe, default_recipes
from visionserve.runtime import openvino as ov_backend
from visionserve.runtime.model import ServedModel
from visionserve.runtime.cpus import cpu_count
from visionserve.runtime.settings import RuntimeSettings
from visionserve.store.manifest import ModelManifest
from visionserve.store.store import ModelStore
from visionserve.types import Detections, PredictParams
from visionserve.vision.boxes import box_iou

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("openvino-models"), mirror=str(mirror))
    store.pull("yolox-nano")
    return store


def on(manifest: ModelManifest, backend: str, options: dict[str, str] | None = None) -> ModelManifest:
    return manifest.model_copy(update={"backend": backend, "backend_options": options or {}})


def detect(model: ServedModel, image: Path) -> Detections:
    pixels = decode_image(image.read_bytes()).pixels
    return model.predict(pixels, model.thresholds(PredictParams()), {})


def loaded(manifest: ModelManifest, runtime: RuntimeSettings | None = None, **kwargs: object) -> ServedModel:
    model = ServedModel(manifest, runtime or RuntimeSettings(), **kwargs)  # type: ignore[arg-type]
    model.load()
    return model


def test_openvino_finds_what_onnx_runtime_finds(store: ModelStore, images: Path) -> None:
    base = store.manifest("yolox-nano")
    # OpenVINO runs the file's fixed size; ONNX Runtime is compared at that size too.
    full_size = RuntimeSettings(minimal_padding=False)
    for image in ("dog.jpg", "horses.jpg"):
        reference = detect(loaded(base, full_size), images / image)
        openvino = loaded(on(base, "openvino", F32))
        assert openvino.family.input.pad_stride == 0  # minimal padding needs ONNX Runtime
        got = detect(openvino, images / image)
        assert len(reference) >= 3
        assert got.label_names() == reference.label_names()
        # Same float graph, another engine: the boxes agree to a fraction of a pixel.
        assert np.diag(box_iou(reference.boxes, got.boxes)).min() > 0.99
        assert np.abs(reference.scores - got.scores).max() < 0.01


def test_worker_and_wide_sessions_get_their_threads_and_the_manifest_options(store: ModelStore) -> None:
    model = loaded(on(store.manifest("yolox-nano"), "openvino", F32), sessions=2)
    assert all(isinstance(s, ov_backend.OpenVINOSession) for s in (model.session, *model.worker_sessions))
    threads = [s.compiled.get_property("INFERENCE_NUM_THREADS") for s in model.worker_sessions]
    assert model.session.compiled.get_property("INFERENCE_NUM_THREADS") == cpu_count()
    if cpu_count() > 1:
        assert threads == [1, 1] and model.has_wide_session
    assert model.session.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def test_the_manifest_cannot_change_a_sessions_thread_count(store: ModelStore) -> None:
    # The scheduler runs one worker session per core; a manifest asking for more would
    # oversubscribe them. (A number in the manifest is read as its text.)
    base = store.manifest("yolox-nano")
    options = {**F32, "INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": "1"}
    manifest = ModelManifest.model_validate(
        {**base.model_dump(), "folder": base.folder, "backend": "openvino", "backend_options": options}
    )
    model = loaded(manifest, sessions=2)
    assert manifest.backend_options["INFERENCE_NUM_THREADS"] == "2"
    if cpu_count() > 1:
        assert [s.compiled.get_property("INFERENCE_NUM_THREADS") for s in model.worker_sessions] == [1, 1]


def test_a_recipe_needing_a_cpu_capability_is_offered_only_where_openvino_reports_it() -> None:
    capabilities = ov_backend.cpu_capabilities()
    assert "FP32" in capabilities
    assert RECIPES["openvino-bf16"].available() == ("BF16" in capabilities)
    needs = Recipe("x", "needs what no CPU has", backend="openvino", cpu_capability="NO_SUCH_THING")
    assert not needs.available()
    with pytest.raises(ModelError, match=r"runs in NO_SUCH_THING \(this one: .*FP32"):
        needs.require()


def test_bf16_option_reaches_openvino_where_the_cpu_has_bf16(store: ModelStore) -> None:
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16: OpenVINO runs bf16 versions in float32")
    model = loaded(on(store.manifest("yolox-nano"), "openvino", {"INFERENCE_PRECISION_HINT": "bf16"}))
    assert model.session.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16


def test_batching_falls_back_to_single_images(store: ModelStore, images: Path) -> None:
    model = loaded(on(store.manifest("yolox-nano"), "openvino", F32), max_batch_size=4)
    assert model.max_batch_size == 1
    assert "dog" in detect(model, images / "dog.jpg").label_names()


def test_without_openvino_the_model_fails_to_load_saying_what_to_install(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    monkeypatch.setattr(ov_backend, "_core", None)
    model = ServedModel(on(store.manifest("yolox-nano"), "openvino"), RuntimeSettings())
    with pytest.raises(ModelError, match=r"pip install 'visionserve\[openvino\]'"):
        model.load()
    assert model.state.value == "failed"
    # optimize then offers only the ONNX Runtime recipes, and refuses a named OpenVINO one.
    assert not ov_backend.available()
    assert [r.name for r in default_recipes()] == ["int8", "int8-mixed"]
    with pytest.raises(ModelError, match="openvino"):
        RECIPES["openvino-bf16"].require()


def test_unknown_backend_is_a_model_error(store: ModelStore) -> None:
    model = ServedModel(on(store.manifest("yolox-nano"), "tensorrt"), RuntimeSettings())
    with pytest.raises(ModelError, match="unknown backend 'tensorrt'"):
        model.load()


def test_optimize_measures_the_openvino_recipes_and_installs_the_winner(
    store: ModelStore, mirror: Path, images: Path, tmp_path: Path
) -> None:
    assert {"openvino", "openvino-bf16", "openvino-int8"} <= {r.name for r in default_recipes()}
    # Bars at zero, so that the measured winner is installed whatever this machine's timing.
    report = optimize_model(
        store, "yolox-nano", [images / "dog.jpg"], [images / "dog.jpg", images / "horses.jpg"],
        recipes=["openvino", "openvino-bf16"], min_agreement=0.0, min_speedup=0.0, augment=False,
        seconds=0.2, rounds=1,
    )
    by_name = {c.name: c for c in report.candidates}
    assert set(by_name) == {"openvino", "openvino-bf16"} and report.installed
    assert all(c.backend == "openvino" and c.throughput > 0 and c.cpu_ms > 0 for c in by_name.values())
    # The float graph on OpenVINO keeps the float model's detections.
    assert by_name["openvino"].agreement == 1.0
    winner = max(report.candidates, key=lambda c: c.throughput)
    assert report.installed == f"yolox-nano@{winner.name}"
    installed = store.manifest(report.installed)
    assert installed is not None and installed.backend == "openvino"
    assert installed.backend_options == dict(RECIPES[winner.name].backend_options)
    assert all(check.ok for check in store.verify(report.installed))

    # Served like any other version, and only the inference process loads OpenVINO.
    from conftest import start_server

    config = tmp_path / "openvino.toml"
    config.write_text(f'[[models]]\nname = "yolox-nano"\nversion = "{winner.name}"\n')
    server = start_server(store.root, mirror, tmp_path, "--config", str(config),
                          env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    try:
        r = post_image(server.url, images / "dog.jpg")
        with server.client() as c:
            (status,) = c.get("/status").json()["models"]
        (engine,) = children(server.process.pid)
        assert "libopenvino" in mapped_libraries(engine)
        assert "openvino" not in mapped_libraries(server.process.pid)
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "yolox-nano", "version": winner.name}
    assert (status["version"], status["backend"], status["ready"]) == (winner.name, "openvino", True)
    expected = detect(loaded(installed), images / "dog.jpg")
    assert [d["label"] for d in body["detections"]] == expected.label_names()
    assert [d["confidence"] for d in body["detections"]] == pytest.approx(expected.scores.tolist(), abs=1e-3)


def test_optimize_rejects_a_recipe_that_fails_here_and_goes_on(store: ModelStore, images: Path) -> None:
    broken = Recipe("broken", "an option OpenVINO refuses", backend="openvino",
                    backend_options={"INFERENCE_PRECISION_HINT": "no-such-precision"})
    report = optimize_model(
        store, "yolox-nano", [images / "dog.jpg"], recipes=[broken, "openvino", "openvino"],
        min_agreement=0.0, min_speedup=9.0, augment=False, seconds=0.2, rounds=1,
    )
    # Each recipe once; the broken one rejected with OpenVINO's reason, the other measured.
    assert [c.name for c in report.candidates] == ["broken", "openvino"]
    failed, measured = report.candidates
    assert failed.reason.startswith("failed: OpenVINO cannot load") and not failed.accepted
    assert measured.throughput > 0 and measured.agreement == 1.0
    assert "broken" in report.summary() and report.installed is None
