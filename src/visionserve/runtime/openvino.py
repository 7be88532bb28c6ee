"""OpenVINO as an optional engine: the same ONNX file, compiled by OpenVINO's CPU plugin.

A model version runs here when its manifest says ``backend = "openvino"``;
``visionserve models optimize`` writes such versions when OpenVINO measures fastest on the
machine (with ``INFERENCE_PRECISION_HINT = bf16``, say, on CPUs with AVX512-BF16 or AMX).
Install it with ``pip install visionserve[openvino]``.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from visionserve.errors import ModelError

if TYPE_CHECKING:
    import openvino as ov

_core_lock = threading.Lock()
_core: ov.Core | None = None


@dataclass(frozen=True, slots=True)
class Port:
    """An input or output as ``ort.InferenceSession.get_inputs()`` describes it."""

    name: str
    shape: list[int | None]  # None where the dimension is dynamic


class OpenVINOSession:
    """Runs a compiled OpenVINO model through the calls the server makes on an ONNX Runtime
    session: ``get_inputs()``, ``get_outputs()`` and ``run(None, {input: array})``."""

    def __init__(self, compiled: ov.CompiledModel) -> None:
        self.compiled = compiled
        self._inputs = [_port(p) for p in compiled.inputs]
        self._outputs = [_port(p) for p in compiled.outputs]
        self._output_index = {p.name: i for i, p in enumerate(self._outputs)}
        self._request = compiled.create_infer_request()
        # One infer request, so one run at a time. Each worker has a session of its own, so
        # the lock is only ever contended when more threads than sessions share one.
        self._lock = threading.Lock()

    def get_inputs(self) -> list[Port]:
        return self._inputs

    def get_outputs(self) -> list[Port]:
        return self._outputs

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names) if output_names else [p.name for p in self._outputs]
        with self._lock:  # the GIL is released while OpenVINO runs
            # share_outputs=False: the request's output buffers are reused by its next run.
            result = self._request.infer(dict(feeds), share_inputs=True, share_outputs=False)
            return [result[self._output_index[n]] for n in names]


def create_session(model: Path | bytes, threads: int, options: Mapping[str, str], *, name: str = "") -> OpenVINOSession:
    """An OpenVINO CPU session over an ONNX file, using ``threads`` cores for one run.

    One stream and no core pinning: the server runs several sessions side by side (one per
    worker) and schedules them itself, as it does with ONNX Runtime's single-threaded
    sessions. ``options`` are OpenVINO properties and override these defaults.
    """
    label = name or str(model)
    if isinstance(model, bytes):
        message = "the OpenVINO backend loads model files, not in-memory graphs"
        raise ModelError(message, detail=f"{label}: {message}")
    core = _shared_core(label)
    config: dict[str, Any] = {
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
        **options,
        # Not the manifest's to set: the scheduler counts on one core per worker session.
        "INFERENCE_NUM_THREADS": threads,
    }
    try:
        return OpenVINOSession(core.compile_model(str(model), "CPU", config))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
        # OpenVINO's text names the file: the log gets it, clients a reason.
        raise ModelError("OpenVINO cannot load the model file", detail=f"OpenVINO cannot load {label}: {e}") from None


def available() -> bool:
    """Whether OpenVINO is installed here (found, not imported: that costs 100 ms and memory)."""
    return importlib.util.find_spec("openvino") is not None


def cpu_capabilities() -> list[str]:
    """The precisions and instruction sets OpenVINO's CPU plugin reports for this CPU
    (``FP32``, ``BF16``, ``INT8``, ...)."""
    return [str(c) for c in _shared_core("OpenVINO").get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _shared_core(label: str) -> ov.Core:
    """The process's OpenVINO core (it holds the plugins; one is enough)."""
    global _core
    with _core_lock:
        if _core is None:
            try:
                import openvino as ov
            except ImportError:
                raise ModelError(
                    "the model runs on OpenVINO, which is not installed: pip install 'visionserve[openvino]'",
                    detail=f"{label} runs on OpenVINO, which is not installed",
                ) from None
            except Exception as e:  # installed, but its native libraries do not load
                raise ModelError(
                    "the model runs on OpenVINO, which does not load here",
                    detail=f"{label} runs on OpenVINO, which does not load here: {e}",
                ) from None
            try:
                _core = ov.Core()
            except Exception as e:  # a broken install: missing plugins or libraries
                raise ModelError(
                    "the model runs on OpenVINO, which does not start here",
                    detail=f"{label} runs on OpenVINO, which does not start here: {e}",
                ) from None
        return _core


def _port(port: Any) -> Port:
    shape = port.get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
    return Port(port.get_any_name(), dims)
