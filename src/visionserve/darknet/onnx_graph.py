"""Translating a planned darknet network and its weights into an ONNX graph.

Batch normalisation is folded into the convolution before it. The graph has one input,
``input`` [N, C, H, W] (RGB 0..1, N dynamic), and one output per detection head: the raw
tensor that the [region] or [yolo] layer would decode, named ``region`` or ``yolo_<k>``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from visionserve.darknet.errors import DarknetError
from visionserve.darknet.network import INPUT, Layer, Network
from visionserve.darknet.weights import DarknetWeights

OPSET = 13
IR_VERSION = 8  # readable by every onnxruntime the package supports
INPUT_NAME = "input"
BATCH_DIM = "N"
# Darknet's batch-norm epsilon (.000001), applied as OpenCV's importer does: 1/sqrt(var + eps).
BN_EPS = 1e-6
LEAKY_SLOPE = 0.1


def check_weights_size(network: Network, weights: DarknetWeights) -> None:
    """Raises unless the file holds exactly the parameters the cfg implies, naming the section."""
    expected = weights.header_bytes + 4 * network.param_count
    if weights.file_bytes == expected:
        return
    sizes = f"the file has {weights.file_bytes:,} bytes; the cfg implies {expected:,} ({weights.header_bytes}-byte header + {network.param_count:,} float32)"
    if weights.file_bytes < expected:
        available = (weights.file_bytes - weights.header_bytes) // 4
        used = 0
        for layer in network.layers:
            used += layer.params
            if used > available:
                raise layer.section.error(f"weights file is truncated: it ends inside this layer's parameters; {sizes}")
    extra = weights.file_bytes - expected
    weighted = [layer for layer in network.layers if layer.params]
    if not weighted:
        raise DarknetError(f"weights file is {extra:,} bytes too long for this cfg, which has no parameters; {sizes}")
    raise weighted[-1].section.error(
        f"weights file is {extra:,} bytes too long for this cfg (this is the last layer with parameters); {sizes}"
    )


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def activation(self, kind: str, x: str, prefix: str) -> str:
        if kind == "linear":
            return x
        if kind == "leaky":
            return self.node("LeakyRelu", [x], f"{prefix}_leaky", alpha=LEAKY_SLOPE)
        if kind == "relu":
            return self.node("Relu", [x], f"{prefix}_relu")
        if kind == "logistic":
            return self.node("Sigmoid", [x], f"{prefix}_logistic")
        if kind == "swish":
            s = self.node("Sigmoid", [x], f"{prefix}_swish_sigmoid")
            return self.node("Mul", [x, s], f"{prefix}_swish")
        if kind == "mish":  # x * tanh(softplus(x)); ONNX's Mish op needs opset 18
            sp = self.node("Softplus", [x], f"{prefix}_mish_softplus")
            t = self.node("Tanh", [sp], f"{prefix}_mish_tanh")
            return self.node("Mul", [x, t], f"{prefix}_mish")
        raise AssertionError(f"activation {kind} passed validation but has no translation")


def build_onnx(network: Network, weights: DarknetWeights, graph_name: str = "darknet") -> tuple[onnx.ModelProto, list[str]]:
    """The ONNX model and its output names, one per head in cfg order."""
    check_weights_size(network, weights)
    g = _GraphBuilder()
    names: dict[int, str] = {INPUT: INPUT_NAME}
    offset = 0
    for layer in network.layers:
        prefix = f"l{layer.index}_{layer.kind}"
        src = [names[i] for i in layer.inputs]
        if layer.kind == "convolutional":
            values = weights.params[offset : offset + layer.params]
            offset += layer.params
            names[layer.index] = _conv(g, layer, src[0], values, prefix)
        elif layer.kind == "maxpool":
            a = layer.attrs
            pads = [a["pad_begin"], a["pad_begin"], a["pad_end"], a["pad_end"]]
            names[layer.index] = g.node(
                "MaxPool", src, prefix, kernel_shape=[a["size"]] * 2, strides=[a["stride"]] * 2, pads=pads
            )
        elif layer.kind == "route":
            names[layer.index] = _route(g, layer, network, src, prefix)
        elif layer.kind == "shortcut":
            added = g.node("Add", src, f"{prefix}_add")
            names[layer.index] = g.activation(layer.attrs["activation"], added, prefix)
        elif layer.kind == "upsample":
            s = float(layer.attrs["stride"])
            scales = g.const(f"{prefix}_scales", np.array([1, 1, s, s], np.float32))
            names[layer.index] = g.node(
                "Resize", [src[0], "", scales], prefix,
                mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
            )
        elif layer.kind == "reorg":
            names[layer.index] = _reorg(g, layer, network, src[0], prefix)
        else:  # dropout is nothing at inference; heads are decoded outside the graph
            names[layer.index] = src[0]

    outputs = []
    for k, head in enumerate(network.heads):
        out_name = "region" if head.kind == "region" else f"yolo_{k}"
        g.node("Identity", [names[head.source]], out_name)
        c, h, w = network.layers[head.source].shape
        outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [BATCH_DIM, c, h, w]))

    net = network.net
    graph = helper.make_graph(
        g.nodes,
        graph_name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, net.channels, net.height, net.width])],
        outputs,
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="visionserve-darknet",
    )
    onnx.checker.check_model(model)
    return model, [o.name for o in outputs]


def _conv(g: _GraphBuilder, layer: Layer, x: str, values: np.ndarray, prefix: str) -> str:
    a = layer.attrs
    n, size, groups = a["filters"], a["size"], a["groups"]
    # File order: biases, then (with batch norm) scales, rolling mean, rolling variance, then weights.
    bias = values[:n].astype(np.float32)
    pos = n
    if a["batch_normalize"]:
        scales, mean, var = (values[pos + i * n : pos + (i + 1) * n].astype(np.float64) for i in range(3))
        pos += 3 * n
    kernel = values[pos:].reshape(n, a["in_channels"] // groups, size, size).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise layer.section.error("the weights file holds NaN or infinite values for this layer")
    if a["batch_normalize"]:
        if np.any(var < 0):
            raise layer.section.error("the weights file holds a negative batch-norm variance for this layer")
        factor = scales / np.sqrt(var + BN_EPS)
        kernel = (kernel * factor[:, None, None, None]).astype(np.float32)
        bias = (bias - mean * factor).astype(np.float32)
    w = g.const(f"{prefix}_W", kernel)
    b = g.const(f"{prefix}_B", bias)
    p = a["padding"]
    y = g.node(
        "Conv", [x, w, b], f"{prefix}_conv",
        kernel_shape=[size, size], strides=[a["stride"]] * 2, pads=[p, p, p, p], group=groups,
    )
    return g.activation(a["activation"], y, prefix)


def _route(g: _GraphBuilder, layer: Layer, network: Network, src: list[str], prefix: str) -> str:
    groups, group_id = layer.attrs["groups"], layer.attrs["group_id"]
    parts = src
    if groups > 1:  # each input contributes its group_id-th slice of channels
        parts = []
        for i, (name, source) in enumerate(zip(src, layer.inputs)):
            part = network.layers[source].shape[0] // groups
            starts = g.const(f"{prefix}_s{i}_starts", np.array([group_id * part], np.int64))
            ends = g.const(f"{prefix}_s{i}_ends", np.array([(group_id + 1) * part], np.int64))
            axes = g.const(f"{prefix}_s{i}_axes", np.array([1], np.int64))
            parts.append(g.node("Slice", [name, starts, ends, axes], f"{prefix}_s{i}"))
    if len(parts) == 1:
        return parts[0]
    return g.node("Concat", parts, prefix, axis=1)


def _reorg(g: _GraphBuilder, layer: Layer, network: Network, x: str, prefix: str) -> str:
    """Darknet's reorg, which is not a plain space-to-depth.

    Darknet reads its C x H x W input as if it were (C/s^2) x (H*s) x (W*s) and writes output
    channel (dy*s + dx) * C/s^2 + c at (j, i) from that view's (c, j*s + dy, i*s + dx); the
    result, laid out C x H x W, is then taken as (C*s^2) x (H/s) x (W/s).
    """
    s = layer.attrs["stride"]
    c, h, w = network.layers[layer.inputs[0]].shape
    view = g.const(f"{prefix}_view", np.array([0, c // (s * s), h, s, w, s], np.int64))
    out_shape = g.const(f"{prefix}_shape", np.array([0, *layer.shape], np.int64))
    v = g.node("Reshape", [x, view], f"{prefix}_view_r")
    t = g.node("Transpose", [v], f"{prefix}_perm", perm=[0, 3, 5, 1, 2, 4])
    return g.node("Reshape", [t, out_shape], prefix)
