"""The versions tried: each a graph (the float one, or an ONNX Runtime ``quantize_static``
result with some parts kept float) and the engine that runs it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from visionserve.errors import ModelError
from visionserve.optimize.calibration import TensorReader
from visionserve.optimize.graph import activation_inputs, depthwise_convs, head_nodes, stem_convs
from visionserve.runtime.session import OPTIONAL_BACKENDS

FloatPart = Literal["head", "depthwise", "stem"]

_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
_FORMAT = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}


@dataclass(frozen=True, slots=True)
class Quantization:
    """ONNX Runtime static quantization settings, and which parts of the graph stay float."""

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


# Percentile calibration: min-max let a few outlying activations set the 8-bit step
# (YOLOX-Nano on the test images: 29% of detections kept with min-max, 76% with this).
INT8 = Quantization(calibration="percentile")
INT8_MIXED = Quantization(quant_format="qoperator", calibration="percentile", keep_float=("head", "depthwise", "stem"))


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str  # also the default version name of the result
    description: str
    quantization: Quantization | None = None  # None: the float graph as it is
    backend: str = "onnxruntime"
    backend_options: dict[str, str] = field(default_factory=dict)
    # A CPU capability the engine must report (OpenVINO's OPTIMIZATION_CAPABILITIES, e.g. BF16).
    # Without it the engine would quietly run another precision, and a version measured so
    # would be installed asking for one it never ran in.
    cpu_capability: str | None = None

    def available(self) -> bool:
        """Whether this machine has the recipe's engine (OpenVINO is optional) and the CPU
        capability it needs."""
        return self._missing() is None

    def require(self) -> None:
        missing = self._missing()
        if missing is not None:
            raise ModelError(f"recipe {self.name!r} needs {missing}")

    def _missing(self) -> str | None:
        if self.backend not in OPTIONAL_BACKENDS:
            return None
        engine = importlib.import_module(OPTIONAL_BACKENDS[self.backend])
        if not engine.available():
            return f"{self.backend}: pip install 'visionserve[{self.backend}]'"
        if self.cpu_capability and self.cpu_capability not in engine.cpu_capabilities():
            return f"a CPU that {self.backend} runs in {self.cpu_capability} (this one: {', '.join(engine.cpu_capabilities())})"
        return None


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("int8", "INT8 static, QDQ, per-channel weights, percentile calibration; detection head float", INT8),
        Recipe(
            "int8-mixed",
            "INT8 static, QOperator, per-channel weights, percentile calibration; "
            "depthwise layers (and their input activations), stem and head float",
            INT8_MIXED,
        ),
        # OpenVINO picks bf16 by itself on CPUs that have it; the float version asks for f32.
        Recipe("openvino", "OpenVINO, float32", backend="openvino", backend_options={"INFERENCE_PRECISION_HINT": "f32"}),
        Recipe(
            "openvino-bf16",
            "OpenVINO, bfloat16 inference (CPUs with AVX512-BF16 or AMX)",
            backend="openvino",
            backend_options={"INFERENCE_PRECISION_HINT": "bf16"},
            cpu_capability="BF16",
        ),
        Recipe(
            "openvino-int8",
            "OpenVINO running the int8 recipe's graph (its low-precision pipeline takes the Q/DQ pairs)",
            INT8,
            backend="openvino",
            backend_options={"INFERENCE_PRECISION_HINT": "f32"},
        ),
    )
}


def default_recipes() -> list[Recipe]:
    """Every recipe whose engine is installed here."""
    return [r for r in RECIPES.values() if r.available()]
