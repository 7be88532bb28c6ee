"""Inference sessions built from the runtime settings: ONNX Runtime, or another engine a
model version names (``ModelManifest.backend``)."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from visionserve.errors import ModelError
from visionserve.runtime.cpus import cpu_count
from visionserve.runtime.onnx_file import NOT_ONNX
from visionserve.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    import numpy as np

# ONNX Runtime is imported when a session is made: the HTTP process imports this module but
# holds no session when inference runs in the inference process, and ONNX Runtime would
# add about 20 MB to it (docs/benchmarks.md).

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# ONNX Runtime's exception types (onnxruntime.capi.onnxruntime_pybind11_state) -> what they say.
_ORT_REASONS = {
    "InvalidProtobuf": NOT_ONNX,  # not protobuf at all, or truncated
    "InvalidArgument": NOT_ONNX,  # e.g. an empty file: "No graph was found"
    "InvalidGraph": "the ONNX graph is invalid",
    "NoSuchFile": "the model file is missing",
    "NotImplemented": "the ONNX graph uses an operator or type ONNX Runtime does not implement",
}

_shared_arena = threading.Lock()
_shared_arena_ready = False


class Session(Protocol):
    """What the server uses of an inference session. ``onnxruntime.InferenceSession`` has it,
    and each optional engine's session provides it."""

    def get_inputs(self) -> Sequence[Any]: ...  # each with ``.name`` and ``.shape``

    def get_outputs(self) -> Sequence[Any]: ...

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


# Engines other than ONNX Runtime: backend name -> module with ``create_session(model, threads,
# options, name=...)`` returning a ``Session``. Imported only when a model needs one.
OPTIONAL_BACKENDS = {"openvino": "visionserve.runtime.openvino"}
BACKENDS = ("onnxruntime", *OPTIONAL_BACKENDS)


def create_session(
    model: Path | bytes,
    runtime: RuntimeSettings,
    *,
    intra_op_threads: int | None = None,
    name: str = "",
    backend: str = "onnxruntime",
    options: dict[str, str] | None = None,
) -> Session:
    """A CPU session for a model file (or serialized model bytes).

    ``intra_op_threads`` overrides the settings (the per-worker sessions use 1). ``options``
    are the engine's own settings: session config entries for ONNX Runtime, properties for
    OpenVINO.
    """
    threads = intra_op_threads or runtime.intra_op_threads or cpu_count()
    if backend != "onnxruntime":
        if backend not in OPTIONAL_BACKENDS:
            message = f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"
            raise ModelError(message, detail=f"{_label(model, name)}: {message}")
        engine = importlib.import_module(OPTIONAL_BACKENDS[backend])
        return engine.create_session(model, threads, options or {}, name=name)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = runtime.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[runtime.graph_optimization])
    opts.enable_cpu_mem_arena = runtime.memory_arena
    if runtime.memory_arena:
        # One arena for all of this process's sessions instead of one each. It is
        # thread-safe, so runs on several workers draw from it at once; memory freed by one
        # session's run serves the next run of any other. Measured 18 MB less for three
        # YOLOX-Nano sessions at the same speed.
        _register_shared_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
    # Spinning keeps a run's threads awake between operators (a 2-thread YOLOX-Nano run: 7.7
    # instead of 11 ms); it stops when the run returns, so idle threads never hold a core
    # that the other workers or the HTTP process need (docs/benchmarks.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if runtime.allow_spinning else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    for key, value in (options or {}).items():
        opts.add_session_config_entry(key, value)
    opts.log_severity_level = 3  # errors only; ORT's warnings are not for end users
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for bad files
        # ORT's text names the file: the log gets it, clients a reason by ORT's error type.
        reason = _ORT_REASONS.get(type(e).__name__, "ONNX Runtime cannot load the model file")
        raise ModelError(reason, detail=f"ONNX Runtime cannot load {_label(model, name)}: {e}") from None


def _label(model: Path | bytes, name: str) -> str:
    return name or (f"an in-memory graph of {len(model)} bytes" if isinstance(model, bytes) else str(model))


def _register_shared_arena(ort) -> None:  # type: ignore[no-untyped-def]
    """Registers, once per process, the CPU arena that sessions with ``use_env_allocators`` share."""
    global _shared_arena_ready
    with _shared_arena:
        if _shared_arena_ready:
            return
        same_as_requested = 1  # grow by what a run asks for, not to the next power of two
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, same_as_requested, -1, -1))
        _shared_arena_ready = True
