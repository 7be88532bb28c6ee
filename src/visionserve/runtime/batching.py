"""Giving a fixed-batch ONNX graph a dynamic batch dimension, so several images run at once.

Exports like YOLOX's bake batch size 1 into the graph: into the input and output shapes and
into the target shapes of Reshape nodes (``[1, 85, -1]``). ``0`` in a Reshape target means
"copy this dimension from the input", so those become ``[0, 85, -1]``. Graphs with any
other batch-dependent construct are left alone (``None``); the caller checks the variant
against the original before using it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from visionserve.runtime.onnx_file import read_onnx

log = logging.getLogger("visionserve.models")

BATCH_DIM = "batch"


def graph_batch_size(path: Path) -> int | str | None:
    """The batch dimension of a model's first input: an int when fixed, its name when dynamic."""
    dims = read_onnx(path, external_data=False).graph.input[0].type.tensor_type.shape.dim
    if not dims:
        return None
    return dims[0].dim_value or dims[0].dim_param or None


def dynamic_batch_variant(path: Path) -> bytes | None:
    """The serialized model with a symbolic batch dimension, or None when it cannot be made safely."""
    from onnx import numpy_helper

    model = read_onnx(path)
    graph = model.graph
    if len(graph.input) != 1:
        return None
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_value not in (0, 1):
            return None
        dims[0].dim_param = BATCH_DIM  # clears dim_value (one-of)
    # Intermediate shape annotations still say 1; ORT re-infers them.
    del graph.value_info[:]

    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type in ("Expand", "Tile", "ConstantOfShape"):
            return None  # may bake the batch size in ways a Reshape rewrite does not cover
        if node.op_type != "Reshape":
            continue
        target = node.input[1]
        if target in initializers:
            tensor = initializers[target]
        elif target in constants:
            tensor = constants[target].attribute[0].t
        else:
            continue  # computed at run time from Shape(): already batch-agnostic
        shape = numpy_helper.to_array(tensor)
        if shape.ndim != 1 or shape.size == 0 or shape[0] != 1:
            continue
        fixed = shape.copy()
        fixed[0] = 0
        tensor.CopyFrom(numpy_helper.from_array(fixed.astype(shape.dtype), tensor.name))
    return model.SerializeToString()


def same_outputs(single: list[np.ndarray], batched: list[np.ndarray], atol: float = 1e-4) -> bool:
    return all(a.shape == b.shape and np.allclose(a, b, atol=atol) for a, b in zip(single, batched))
