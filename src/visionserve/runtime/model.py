"""A model ready to serve: manifest + family + inference sessions (ONNX Runtime, or the
engine the manifest names)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Sequence

import numpy as np

from visionserve.errors import InvalidParameter, ModelError, ModelNotReady, VisionServeError, unexpected_error
from visionserve.families import get_family
from visionserve.families.base import ModelFamily
from visionserve.runtime.batching import dynamic_batch_variant, graph_batch_size, same_outputs
from visionserve.runtime.cpus import cpu_count
from visionserve.runtime.input_size import variable_size_source
from visionserve.runtime.session import Session, create_session
from visionserve.runtime.settings import RuntimeSettings
from visionserve.store.manifest import ModelManifest
from visionserve.types import Detections, PredictParams, Thresholds
from visionserve.vision.letterbox import padded_to

log = logging.getLogger("visionserve.models")


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


class ServedModel:
    """Serves one model with two kinds of session over the same graph.

    ``worker_sessions`` (one per scheduler worker thread, each with that worker's share of
    the cores, normally one) serve requests that run side by side; ``session`` (all cores)
    serves a request that has the machine to itself. On a one-core machine they are the same.
    """

    def __init__(
        self,
        manifest: ModelManifest,
        runtime: RuntimeSettings,
        *,
        max_batch_size: int = 1,
        sessions: int | None = None,
        wide: bool = True,
    ) -> None:
        """``sessions``: how many worker sessions to create (default: one per scheduler
        worker); ``wide``: whether to add the all-cores session. An inference worker process
        holds one worker session, and worker 0 also the wide one."""
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.runtime = runtime
        self.family: ModelFamily = get_family(manifest.family)(manifest)
        self.labels = self.family.labels
        self._label_ids = {label: i for i, label in enumerate(self.labels)}
        self.state = ModelState.LOADING
        self.error: str | None = None
        self.requested_batch_size = max_batch_size
        self.max_batch_size = 1  # what the graph allows, known after load()
        self.session: Session | None = None  # the wide session (all cores); None when unloaded
        self.worker_sessions: list[Session] = []
        self._free_sessions: list[Session] = []
        self._thread_session = threading.local()
        self.input_name = ""
        self._lock = threading.Lock()
        self._sessions = sessions
        self._wide = wide
        self._remote_wide: bool | None = None  # set when worker processes hold the sessions

    # -- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        """Creates the sessions, checks the graph fits the family, and warms every session up."""
        try:
            cores = cpu_count()
            workers = self.runtime.inference_workers or cores
            worker_threads = max(1, cores // workers)
            wide_threads = (self.runtime.intra_op_threads or cores) if self._wide else worker_threads
            workers = self._sessions or workers
            batching = self.requested_batch_size > 1
            if batching and self.manifest.backend != "onnxruntime":
                log.warning("%s: batching needs the ONNX Runtime backend; serving without batching", self.name)
                batching = False
            self.family.input = dataclasses.replace(self.family.input, pad_stride=0)  # until checked below
            stride = None if batching else self._padding_stride()
            variable = variable_size_source(self.manifest.path) if stride else None
            source = (self._batch_source() if batching else variable) or self.manifest.path
            session = self._create_session(source, wide_threads)
            inputs = session.get_inputs()
            if len(inputs) != 1:
                raise ModelError(f"{self.name}: expected one input, the graph has {[i.name for i in inputs]}")
            self.family.validate_outputs([o.shape for o in session.get_outputs()])
            self.input_name = inputs[0].name
            if stride and variable is not None:
                if self._runs_smaller_inputs(session, stride):
                    self.family.input = dataclasses.replace(self.family.input, pad_stride=stride)
                elif isinstance(variable, bytes):  # the rewritten graph fails: load the file as it is
                    source = self.manifest.path
                    session = self._create_session(source, wide_threads)
            # One session per worker, as in the in-process ceiling (one per process), so
            # concurrent runs never share a session.
            worker_sessions = [session]
            if worker_threads != wide_threads:
                worker_sessions = [self._create_session(source, worker_threads) for _ in range(workers)]
            self.session, self.worker_sessions = session, worker_sessions
            self._free_sessions = list(worker_sessions)
            if batching:
                self.max_batch_size = self._checked_batch_size()
            self.warm_up()
            self.state = ModelState.READY
        except Exception as e:
            # What the model's status shows: never the library's text (it names files).
            failure = e if isinstance(e, VisionServeError) else unexpected_error(e, "loading the model")
            self.state, self.error = ModelState.FAILED, failure.message
            raise

    def _create_session(self, source: Path | bytes, threads: int) -> Session:
        m = self.manifest
        return create_session(
            source, self.runtime, intra_op_threads=threads, name=str(m.path), backend=m.backend, options=m.backend_options
        )

    def report(self) -> dict:
        """What an inference process tells the HTTP process's ``attach_workers`` once loaded."""
        return {
            "max_batch_size": self.max_batch_size,
            "has_wide_session": self.has_wide_session,
            "pad_stride": self.family.input.pad_stride,
        }

    def attach_workers(self, report: dict) -> None:
        """Marks the model ready with its sessions held by inference worker processes
        (``report``: what the wide worker said after loading it)."""
        self.max_batch_size = int(report["max_batch_size"])
        self._remote_wide = bool(report["has_wide_session"])
        self.family.input = dataclasses.replace(self.family.input, pad_stride=int(report["pad_stride"]))
        self.state = ModelState.READY

    def _padding_stride(self) -> int | None:
        """The stride to pad letterboxed inputs to, when settings, engine and family allow it."""
        spec = self.family.input
        if not self.runtime.minimal_padding or self.manifest.backend != "onnxruntime" or spec.resize != "letterbox":
            return None
        return self.family.variable_input_stride

    def _runs_smaller_inputs(self, session: Session, stride: int) -> bool:
        """Whether the graph runs a half-height and a half-width input with outputs that fit the
        family at those sizes; minimal padding is used only then."""
        spec = self.family.input
        sizes = {(spec.width, padded_to(spec.height // 2, stride)), (padded_to(spec.width // 2, stride), spec.height)}
        for width, height in sizes - {(spec.width, spec.height)}:
            tensor = np.full((1, 3, height, width), spec.pad_value * spec.scale, np.float32)
            try:
                outputs = session.run(None, {self.input_name: tensor})
                self.family.validate_outputs([o.shape for o in outputs], (width, height))
            except Exception as e:
                log.warning("%s: the graph does not take %dx%d inputs (%s); padding to the full size", self.name, width, height, e)
                return False
        log.info("%s: letterboxed inputs padded to a multiple of %d", self.name, stride)
        return True

    def _batch_source(self) -> Path | bytes | None:
        """The graph to load when batching is wanted: as is when its batch dimension is dynamic,
        else a dynamic-batch variant made in memory (falls back to the file when impossible)."""
        batch = graph_batch_size(self.manifest.path)
        if isinstance(batch, str):
            return None
        variant = dynamic_batch_variant(self.manifest.path) if batch == 1 else None
        if variant is None:
            log.warning("%s: the graph has a fixed batch size; serving without batching", self.name)
        return variant

    def _checked_batch_size(self) -> int:
        """Runs two different images as one batch and singly; batching is used only if they agree."""
        spec = self.family.input
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (2, spec.height, spec.width, 3), dtype=np.uint8)
        tensors = np.stack([self.family.preprocess(img)[0] for img in images])
        try:
            batched = self.run(tensors)
            singles = [self.run(tensors[i : i + 1]) for i in range(2)]
        except Exception as e:
            log.warning("%s: batched inference failed (%s); serving without batching", self.name, e)
            return 1
        for i in range(2):
            if not same_outputs(list(singles[i]), [o[i : i + 1] for o in batched]):
                log.warning("%s: batched outputs differ from single ones; serving without batching", self.name)
                return 1
        log.info("%s: dynamic batching up to %d images", self.name, self.requested_batch_size)
        return self.requested_batch_size

    def warm_up(self) -> None:
        blank = np.full((self.family.input.height, self.family.input.width, 3), 114, np.uint8)
        tensor, _ = self.family.preprocess(blank)
        for session in {id(s): s for s in (self.session, *self.worker_sessions)}.values():
            session.run(None, {self.input_name: tensor[None]})

    @property
    def has_wide_session(self) -> bool:
        if self._remote_wide is not None:
            return self._remote_wide
        return bool(self.worker_sessions) and self.worker_sessions[0] is not self.session

    def unload(self) -> None:
        self.session, self.worker_sessions, self.state = None, [], ModelState.UNLOADED

    # -- inference ---------------------------------------------------------------------

    def decode_min_size(self, *, drawn: bool = False) -> tuple[int, int] | None:
        """How small a JPEG may decode (DCT scaling) for this model: ``jpeg_reduced_decode``
        times its input size; None when reduced decoding is off, or when the image will be
        ``drawn`` on (an annotated image comes back at its own size, so it decodes whole)."""
        factor = self.runtime.jpeg_reduced_decode
        spec = self.family.input
        return (int(spec.width * factor), int(spec.height * factor)) if factor > 0 and not drawn else None

    def thresholds(self, params: PredictParams) -> Thresholds:
        """Request settings over the model's defaults; unknown class labels, or a class list
        with none in it, are a 422."""
        m = self.manifest
        class_ids = None
        if params.classes is not None:
            if not params.classes:  # "classes=," or []: a filter that could keep nothing
                raise InvalidParameter("classes names no label: give labels such as 'person,dog', or leave it out")
            unknown = sorted(c for c in params.classes if c not in self._label_ids)
            if unknown:
                raise InvalidParameter(f"classes: {', '.join(unknown)} not among this model's labels")
            class_ids = np.array(sorted(self._label_ids[c] for c in params.classes), np.int32)
        return Thresholds(
            min_confidence=m.min_confidence if params.min_confidence is None else params.min_confidence,
            iou=m.iou if params.iou is None else params.iou,
            max_detections=m.max_detections if params.max_detections is None else params.max_detections,
            class_ids=class_ids,
        )

    def run(self, batch: np.ndarray, *, wide: bool = True) -> Sequence[np.ndarray]:
        """Raw inference on an [N, C, H, W] batch, on all cores (``wide``) or one worker's share."""
        session = self.session if wide else self._worker_session()
        if session is None:  # unloaded since the request was admitted
            raise ModelNotReady(f"model {self.name!r} is not loaded")
        return session.run(None, {self.input_name: batch})

    def _worker_session(self) -> Session:
        """This thread's own worker session (each scheduler worker thread keeps one)."""
        local = self._thread_session
        if getattr(local, "owner", None) is not self.worker_sessions:
            with self._lock:
                pool = self._free_sessions
                local.session = pool.pop() if pool else self.worker_sessions[0]
                local.owner = self.worker_sessions
        return local.session

    def predict(self, pixels: np.ndarray, thresholds: Thresholds, timings: dict[str, float]) -> Detections:
        """One RGB image -> detections in its pixels; adds stage times (ms) to ``timings``."""
        t0 = time.perf_counter()
        tensor, placement = self.family.preprocess(pixels)
        t1 = time.perf_counter()
        outputs = self.run(tensor[None])
        t2 = time.perf_counter()
        h, w = pixels.shape[:2]
        detections = self.family.postprocess([o[0] for o in outputs], placement, (w, h), thresholds)
        t3 = time.perf_counter()
        timings["preprocess"] = (t1 - t0) * 1e3
        timings["inference"] = (t2 - t1) * 1e3
        timings["postprocess"] = (t3 - t2) * 1e3
        return detections
