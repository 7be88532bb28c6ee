"""The protocol-neutral detection service every protocol adapter calls.

bytes -> decode -> model (family pre-processing, runtime, family post-processing) -> Prediction

Admission control, deadlines and dropping work for departed clients live here and in the
scheduler, so every protocol gets them: an adapter calls ``admit()`` before reading the
request body (refusing is then nearly free), passes the request's deadline, and cancels
the ``detect`` call when its client disconnects.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from visionserve.config import Settings
from visionserve.errors import InvalidImage, ModelNotReady, Unhealthy, VisionServeError
from visionserve.imaging.decode import decode_image
from visionserve.imaging.draw import output_format, render_annotated
from visionserve.runtime.model import ServedModel
from visionserve.runtime.registry import ModelRegistry
from visionserve.runtime.scheduler import Scheduler, Ticket
from visionserve.types import DecodedImage, PredictParams, Prediction


class DetectionService:
    def __init__(self, settings: Settings, registry: ModelRegistry, scheduler: Scheduler) -> None:
        self.settings = settings
        self.registry = registry
        self.scheduler = scheduler
        self.metrics = scheduler.metrics

    # -- health: what every protocol's liveness, readiness and status answers say ---------

    def not_live(self) -> Unhealthy | None:
        """Why the server is not alive and needs restarting, or None: a worker thread stuck
        on one job (the scheduler's ``stuck``)."""
        stuck = self.scheduler.stuck()
        return None if stuck is None else Unhealthy(stuck)

    def not_ready(self) -> VisionServeError | None:
        """Why the server should get no traffic now, or None."""
        if self.scheduler.draining:
            return ModelNotReady("the server is shutting down")
        unhealthy = self.not_live()
        if unhealthy is not None:
            return unhealthy
        if self.scheduler.down:
            return ModelNotReady(f"an inference process is starting again ({self.scheduler.down})")
        if not self.registry.ready:
            failed = self.registry.failed()
            if failed:  # not a wait: loading has ended for these, and only a fix will do
                return ModelNotReady("; ".join(f"model {n!r} failed to load: {why}" for n, why in failed.items()))
            return ModelNotReady("models are still loading")
        return None

    def state(self) -> str:
        """The service's state in one word, for /status."""
        if self.scheduler.stuck():
            return "unhealthy"
        if self.scheduler.draining:
            return "draining"
        if self.scheduler.down:
            return "restarting"  # an inference process is starting again
        if self.registry.ready:
            return "ready"
        return "degraded" if self.registry.failed() else "starting"  # degraded: a model failed to load

    def admit(self, images: int = 1) -> Ticket:
        """A place for one detection request (``with service.admit(): ...``) of ``images``
        images; raises ``Overloaded`` (503 with Retry-After) when the server is full or
        draining. Detections run inside the ``with`` share the request's place."""
        return self.scheduler.admit(images)

    def deadline(self, timeout_ms: float | None, received: float | None = None) -> float | None:
        """The absolute deadline (time.monotonic()) of a request received at ``received`` that
        allows ``timeout_ms``; the server's default timeout applies when it gives none."""
        timeout_ms = timeout_ms if timeout_ms is not None else self.settings.queue.default_timeout_ms
        if timeout_ms is None:
            return None
        return (received if received is not None else time.monotonic()) + timeout_ms / 1e3

    async def detect(
        self,
        model: str | None,
        data: bytes,
        params: PredictParams,
        *,
        deadline: float | None = None,
        annotated: str | None = None,
    ) -> Prediction:
        """Detects objects in an encoded image (JPEG, PNG, ...); ``deadline`` is time.monotonic().

        ``annotated`` ('jpeg' or 'png'): ``prediction.rendered`` is the image with its
        detections drawn, in that format, made where the image was decoded (the pixels stay
        there). ``prediction.image.pixels`` is a stand-in with worker processes either way."""
        served = self.registry.get(model)
        thresholds = served.thresholds(params)  # bad parameters fail before any decoding
        # A bad format fails here, before the image is decoded and run.
        render = None if annotated is None else partial(render_annotated, fmt=output_format(annotated))
        min_size = served.decode_min_size(drawn=render is not None)
        prepare = partial(decode_image, data, max_pixels=self.settings.limits.max_image_pixels, min_size=min_size)
        return await self._predict(served, prepare, thresholds, deadline, render)

    async def detect_pixels(
        self, model: str | None, pixels: np.ndarray, params: PredictParams, *, deadline: float | None = None
    ) -> Prediction:
        """Detects objects in an RGB HxWx3 uint8 array."""
        served = self.registry.get(model)
        thresholds = served.thresholds(params)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 or 0 in pixels.shape:
            raise InvalidImage(f"pixels must be a non-empty HxWx3 uint8 array, got {pixels.dtype} {list(pixels.shape)}")
        image = DecodedImage(np.ascontiguousarray(pixels), pixels.shape[1], pixels.shape[0], "raw")
        # A picklable "prepare" (worker processes receive it); the caller has the pixels already.
        return await self._predict(served, partial(_given, image), thresholds, deadline, None)

    async def _predict(  # type: ignore[no-untyped-def]
        self, served: ServedModel, prepare, thresholds, deadline: float | None, render
    ) -> Prediction:
        start = time.perf_counter()
        outcome, timings = await self.scheduler.run(served, prepare, thresholds, deadline, render)
        image, detections = outcome.image, outcome.detections
        assert image is not None and detections is not None
        detections = detections.scaled(image.scale_x, image.scale_y, image.width, image.height)
        timings["total"] = (time.perf_counter() - start) * 1e3
        self.metrics.observe_stages(served.name, timings)
        return Prediction(served.name, served.version, image, detections, timings, outcome.rendered)


def _given(image: DecodedImage) -> DecodedImage:
    return image
