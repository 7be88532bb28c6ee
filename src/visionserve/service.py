"""The protocol-neutral detection service every protocol adapter calls.

bytes -> decode -> model (family pre-processing, runtime, family post-processing) -> Prediction
"""

from __future__ import annotations

import time

import numpy as np

from visionserve.config import Settings
from visionserve.errors import InvalidImage
from visionserve.imaging.decode import decode_image
from visionserve.runtime.registry import ModelRegistry
from visionserve.runtime.scheduler import Scheduler
from visionserve.types import DecodedImage, PredictParams, Prediction


class DetectionService:
    def __init__(self, settings: Settings, registry: ModelRegistry, scheduler: Scheduler) -> None:
        self.settings = settings
        self.registry = registry
        self.scheduler = scheduler

    async def detect(self, model: str | None, data: bytes, params: PredictParams) -> Prediction:
        """Detects objects in an encoded image (JPEG, PNG, ...)."""
        served = self.registry.get(model)
        thresholds = served.thresholds(params)  # bad parameters fail before any decoding
        t0 = time.perf_counter()
        image = await self.scheduler.decode(
            decode_image, data, max_pixels=self.settings.limits.max_image_pixels
        )
        decode_ms = (time.perf_counter() - t0) * 1e3
        return await self._predict(served.name, image, thresholds, {"decode": decode_ms})

    async def detect_pixels(self, model: str | None, pixels: np.ndarray, params: PredictParams) -> Prediction:
        """Detects objects in an RGB HxWx3 uint8 array."""
        served = self.registry.get(model)
        thresholds = served.thresholds(params)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 or 0 in pixels.shape:
            raise InvalidImage(f"pixels must be a non-empty HxWx3 uint8 array, got {pixels.dtype} {list(pixels.shape)}")
        image = DecodedImage(np.ascontiguousarray(pixels), pixels.shape[1], pixels.shape[0], "raw")
        return await self._predict(served.name, image, thresholds, {})

    async def _predict(self, model: str, image: DecodedImage, thresholds, timings: dict[str, float]) -> Prediction:
        served = self.registry.get(model)
        detections, stage_ms = await self.scheduler.predict(served, image.pixels, thresholds)
        detections = detections.scaled(image.scale_x, image.scale_y, image.width, image.height)
        timings.update(stage_ms)
        return Prediction(served.name, served.version, image, detections, timings)
