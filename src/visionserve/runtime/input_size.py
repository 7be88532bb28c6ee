"""Letting a fixed-size ONNX graph take smaller inputs, so letterboxed images need less padding.

A 4:3 photo letterboxed into YOLOX-Nano's 416x416 input is a third grey padding; padded only
to a multiple of the network's largest stride it fills 416x320, and inference costs about a
quarter less (docs/benchmarks.md). Fully convolutional exports accept such sizes once their
declared input and output shapes stop fixing them. A graph that bakes its size in elsewhere
(a Reshape to a fixed element count, a Resize to fixed ``sizes``) fails at other sizes or
gives outputs of the wrong shape, so the caller runs the variant at smaller sizes and checks
its outputs against the model's family before using it (``ServedModel``).
"""

from __future__ import annotations

from pathlib import Path

from visionserve.errors import ModelError
from visionserve.runtime.onnx_file import read_onnx


def variable_size_source(path: Path) -> Path | bytes | None:
    """What to load for inputs of any height and width: the file itself when its input's
    height and width are already symbolic, else the graph rewritten in memory with symbolic
    ones; None when the graph is not one image input of [N, C, H, W], or cannot be read (the
    engine's own load of the file then says why)."""
    try:
        model = read_onnx(path)
    except ModelError:
        return None
    graph = model.graph
    if len(graph.input) != 1:
        return None
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    if all(d.dim_param or not d.dim_value for d in dims[2:]):
        return path
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # clears dim_value (one-of)
    for output in graph.output:
        # Which output dimensions follow the input's size is not written in the graph:
        # leave all but the batch to ONNX Runtime's shape inference.
        for i, d in enumerate(output.type.tensor_type.shape.dim):
            if i > 0 and d.dim_value:
                d.dim_param = f"{output.name}_{i}"
    # Intermediate shape annotations still hold the full size; ONNX Runtime re-infers them.
    del graph.value_info[:]
    return model.SerializeToString()
