"""ONNX Runtime sessions built from the runtime settings."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from visionserve.config import RuntimeSettings
from visionserve.errors import ModelError

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def create_session(
    model: Path | bytes,
    runtime: RuntimeSettings,
    *,
    intra_op_threads: int | None = None,
    name: str = "",
) -> ort.InferenceSession:
    """A CPU session for a model file (or serialized model bytes).

    ``intra_op_threads`` overrides the settings (the per-worker sessions use 1).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads or runtime.intra_op_threads or cpu_count()
    opts.inter_op_num_threads = runtime.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _OPT_LEVELS[runtime.graph_optimization]
    opts.enable_cpu_mem_arena = runtime.memory_arena
    # Spinning threads burn the cores the other workers (and the HTTP loop) need; measured
    # far slower whenever the machine has anything else to do (docs/benchmarks.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if runtime.allow_spinning else "0")
    opts.log_severity_level = 3  # errors only; ORT's warnings are not for end users
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for bad files
        raise ModelError(f"ONNX Runtime cannot load {name or model}: {e}") from None
