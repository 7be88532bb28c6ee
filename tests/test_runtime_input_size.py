"""Minimal padding: a fixed-size graph made to take smaller inputs, checked before use."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from visionserve.config import RuntimeSettings
from visionserve.runtime.input_size import variable_size_source
from visionserve.runtime.model import ServedModel
from visionserve.store.manifest import ModelManifest

LABELS = [f"c{i}" for i in range(80)]
ROWS = 8 * 8 + 4 * 4 + 2 * 2  # a 64x64 input at strides 8, 16, 32


def _save(tmp_path, nodes, initializers, input_dims, name="m.onnx"):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, ROWS, 85])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def baked_size_graph(tmp_path, input_dims=(1, 3, 64, 64)):
    """YOLOX's output shape for a 64x64 input, computed in a way that only works at 64x64:
    the input flattened, its first ROWS x 85 values taken, reshaped to [1, ROWS, 85]."""
    ints = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    nodes = [
        helper.make_node("Reshape", ["images", "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["taken"]),
        helper.make_node("Reshape", ["taken", "out_shape"], ["output"]),
    ]
    init = [ints("flat_shape", [1, -1]), ints("starts", [0]), ints("ends", [ROWS * 85]), ints("axes", [1]),
            ints("out_shape", [1, ROWS, 85])]
    return _save(tmp_path, nodes, init, list(input_dims))


def manifest_for(path) -> ModelManifest:
    return ModelManifest(name="baked", family="yolox", file=str(path), labels=LABELS, input_width=64, input_height=64)


def test_real_yolox_variant_runs_smaller_inputs(model_dir):
    path = model_dir / "yolox-nano" / "yolox_nano.onnx"
    variant = variable_size_source(path)
    assert isinstance(variant, bytes)
    session = ort.InferenceSession(variant, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = session.run(None, {name: np.full((1, 3, 320, 416), 114, np.float32)})[0]
    assert out.shape == (1, 52 * 40 + 26 * 20 + 13 * 10, 85)
    full = np.random.default_rng(0).uniform(0, 255, (1, 3, 416, 416)).astype(np.float32)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {name: full})[0], original.run(None, {name: full})[0], atol=1e-4)


def test_graph_already_taking_any_size_is_loaded_as_is(tmp_path):
    path = baked_size_graph(tmp_path, input_dims=(1, 3, "height", "width"))
    assert variable_size_source(path) == path


def test_graph_that_bakes_its_size_in_is_served_at_full_size(tmp_path, caplog):
    """The rewritten graph fails at 64x32: the model falls back to the file and full padding,
    and still serves a 4:3 image."""
    path = baked_size_graph(tmp_path)
    assert isinstance(variable_size_source(path), bytes)  # the rewrite itself cannot tell
    model = ServedModel(manifest_for(path), RuntimeSettings())
    with caplog.at_level(logging.WARNING, logger="visionserve.models"):
        model.load()
    assert model.family.input.pad_stride == 0
    assert "does not take" in caplog.text and "padding to the full size" in caplog.text
    tensor, placement = model.family.preprocess(np.zeros((48, 64, 3), np.uint8))
    assert tensor.shape == (3, 64, 64) and placement.net_size is None
    assert model.run(tensor[None])[0].shape == (1, ROWS, 85)  # runs: the full size is what the graph takes


def test_settings_and_batching_turn_minimal_padding_off(model_dir):
    from visionserve.store.store import ModelStore

    manifest = ModelStore(model_dir).manifest("yolox-nano")
    on = ServedModel(manifest, RuntimeSettings())
    off = ServedModel(manifest, RuntimeSettings(minimal_padding=False))
    batched = ServedModel(manifest, RuntimeSettings(), max_batch_size=2)
    for model in (on, off, batched):
        model.load()
    assert (on.family.input.pad_stride, off.family.input.pad_stride, batched.family.input.pad_stride) == (32, 0, 0)
    assert batched.max_batch_size == 2  # a batch's images share one size: the full one
    assert on.report()["pad_stride"] == 32
