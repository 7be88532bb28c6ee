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


def create_session(path: Path, runtime: RuntimeSettings, *, intra_op_threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads or runtime.intra_op_threads or cpu_count()
    opts.inter_op_num_threads = runtime.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _OPT_LEVELS[runtime.graph_optimization]
    opts.log_severity_level = 3  # errors only; ORT's warnings are not for end users
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for bad files
        raise ModelError(f"ONNX Runtime cannot load {path}: {e}") from None
