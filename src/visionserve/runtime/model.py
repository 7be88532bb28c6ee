"""A model ready to serve: manifest + family + ONNX Runtime session."""

from __future__ import annotations

import threading
import time
from enum import Enum
from typing import Sequence

import numpy as np

from visionserve.config import RuntimeSettings
from visionserve.errors import InvalidParameter, ModelError
from visionserve.families import get_family
from visionserve.families.base import ModelFamily
from visionserve.runtime.session import create_session
from visionserve.store.manifest import ModelManifest
from visionserve.types import Detections, PredictParams, Thresholds


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


class ServedModel:
    def __init__(self, manifest: ModelManifest, runtime: RuntimeSettings) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.runtime = runtime
        self.family: ModelFamily = get_family(manifest.family)(manifest)
        self.labels = self.family.labels
        self._label_ids = {label: i for i, label in enumerate(self.labels)}
        self.state = ModelState.LOADING
        self.error: str | None = None
        self.session = None
        self.input_name = ""
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        """Creates the session, checks the graph fits the family, and runs one warm-up inference."""
        try:
            session = create_session(self.manifest.path, self.runtime)
            inputs = session.get_inputs()
            if len(inputs) != 1:
                raise ModelError(f"{self.name}: expected one input, the graph has {[i.name for i in inputs]}")
            self.family.validate_outputs([o.shape for o in session.get_outputs()])
            self.session, self.input_name = session, inputs[0].name
            self.warm_up()
            self.state = ModelState.READY
        except Exception as e:
            self.state, self.error = ModelState.FAILED, str(e)
            raise

    def warm_up(self) -> None:
        blank = np.full((self.family.input.height, self.family.input.width, 3), 114, np.uint8)
        tensor, _ = self.family.preprocess(blank)
        self.run(tensor[None])

    def unload(self) -> None:
        self.session, self.state = None, ModelState.UNLOADED

    # -- inference ---------------------------------------------------------------------

    def thresholds(self, params: PredictParams) -> Thresholds:
        """Request settings over the model's defaults; unknown class labels are a 422."""
        m = self.manifest
        class_ids = None
        if params.classes is not None:
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

    def run(self, batch: np.ndarray) -> Sequence[np.ndarray]:
        """Raw inference on an [N, C, H, W] batch."""
        session = self.session
        if session is None:
            raise ModelError(f"model {self.name!r} is not loaded")
        return session.run(None, {self.input_name: batch})

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
