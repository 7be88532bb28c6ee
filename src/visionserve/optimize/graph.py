"""Reading and preparing the float ONNX graph for quantization."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import version_converter
from onnxruntime.quantization.shape_inference import quant_pre_process

# Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) needs opset 13.
MIN_OPSET = 13
_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def prepare_float_graph(src: Path, dst: Path) -> Path:
    """Raises the opset to at least 13 and runs ORT's pre-quantization pass (shape inference,
    constant folding, BatchNorm folding) so that calibration sees the graph ORT will run."""
    model = onnx.load(str(src))
    if default_opset(model) < MIN_OPSET:
        model = version_converter.convert_version(model, MIN_OPSET)
    raised = dst.with_name(dst.stem + ".opset.onnx")
    onnx.save(model, str(raised))
    try:
        quant_pre_process(str(raised), str(dst), skip_symbolic_shape=True)
    finally:
        raised.unlink(missing_ok=True)
    return dst


def head_nodes(model: onnx.ModelProto) -> set[str]:
    """The last compute layer on every path to an output and everything after it.

    Detection heads concatenate box offsets (tens of grid cells, log sizes) with scores in
    0..1 into one tensor; one 8-bit scale for both ruins the scores, so these stay float.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    found: set[str] = set()
    pending = [o.name for o in model.graph.output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in found:
            continue
        found.add(node.name)
        if node.op_type not in _COMPUTE_OPS:
            pending.extend(node.input)
    return found


def depthwise_convs(model: onnx.ModelProto) -> set[str]:
    """Grouped convolutions with one input channel per group (3x3 depthwise layers)."""
    shapes = {t.name: t for t in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = shapes.get(node.input[1])
        if group > 1 and weight is not None and weight.dims[1] == 1:
            found.add(node.name)
    return found


def stem_convs(model: onnx.ModelProto) -> set[str]:
    """Compute layers fed by a graph input without another compute layer in between."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: set[str] = set()
    seen: set[str] = set()
    pending = [i.name for i in model.graph.input]
    while pending:
        for node in consumers.get(pending.pop(), []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in _COMPUTE_OPS:
                found.add(node.name)
            else:
                pending.extend(node.output)
    return found


def activation_inputs(model: onnx.ModelProto, convs: set[str]) -> set[str]:
    """The activation nodes (e.g. SiLU's Sigmoid and Mul) that produce the inputs of ``convs``:
    keeping them float too spares those layers an 8-bit round trip of their input."""
    producer = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    found: set[str] = set()
    for name in convs:
        node = producer.get(by_name[name].input[0])
        if node is None or node.op_type not in ("Mul", "Sigmoid", "Relu", "Clip", "LeakyRelu", "HardSwish"):
            continue
        found.add(node.name)
        for inp in node.input:
            up = producer.get(inp)
            if up is not None and up.op_type == "Sigmoid":
                found.add(up.name)
    return found
