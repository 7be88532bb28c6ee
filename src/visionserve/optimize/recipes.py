"""The quantization recipes tried, each a set of ONNX Runtime ``quantize_static`` settings
plus which parts of the graph stay float."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from visionserve.optimize.calibration import TensorReader
from visionserve.optimize.graph import activation_inputs, depthwise_convs, head_nodes, stem_convs

FloatPart = Literal["head", "depthwise", "stem"]

_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
_FORMAT = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str  # also the default version name of the result
    description: str
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    calibration: Literal["minmax", "percentile"] = "minmax"
    keep_float: tuple[FloatPart, ...] = ("head",)

    def float_nodes(self, model: onnx.ModelProto) -> set[str]:
        nodes: set[str] = set()
        if "head" in self.keep_float:
            nodes |= head_nodes(model)
        if "depthwise" in self.keep_float:
            dw = depthwise_convs(model)
            nodes |= dw | activation_inputs(model, dw)
        if "stem" in self.keep_float:
            nodes |= stem_convs(model)
        return nodes

    def build(self, float_graph: Path, reader: TensorReader, target: Path) -> Path:
        """Quantizes ``float_graph`` (prepared by ``graph.prepare_float_graph``) to ``target``."""
        model = onnx.load(str(float_graph))
        reader.rewind()
        quantize_static(
            str(float_graph),
            str(target),
            reader,
            quant_format=_FORMAT[self.quant_format],
            per_channel=self.per_channel,
            # u8 activations x s8 weights: the layout MLAS's VNNI/AVX2 integer kernels take.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_CALIBRATION[self.calibration],
            nodes_to_exclude=sorted(self.float_nodes(model)),
        )
        return target


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # Percentile calibration: min-max let a few outlying activations set the 8-bit step
        # (YOLOX-Nano on the test images: 29% of detections kept with min-max, 76% with this).
        Recipe(
            "int8",
            "INT8 static, QDQ, per-channel weights, percentile calibration; detection head float",
            calibration="percentile",
        ),
        Recipe(
            "int8-mixed",
            "INT8 static, QOperator, per-channel weights, percentile calibration; "
            "depthwise layers (and their input activations), stem and head float",
            quant_format="qoperator",
            calibration="percentile",
            keep_float=("head", "depthwise", "stem"),
        ),
    )
}
