"""Where work runs: decode and inference on thread pools, never on the event loop.

Decode and inference have separate pools so that the next image decodes while the current
one is in the model. Inferences run one at a time, each using all the intra-op threads the
session was given, which keeps single-request latency at the model's best.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, TypeVar

import numpy as np

from visionserve.runtime.model import ServedModel
from visionserve.types import Detections, Thresholds

T = TypeVar("T")


class Scheduler:
    def __init__(self, decode_threads: int, inference_workers: int = 1) -> None:
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._infer = ThreadPoolExecutor(inference_workers, thread_name_prefix="infer")

    async def decode(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._decode, partial(fn, *args, **kwargs))

    async def predict(
        self, model: ServedModel, pixels: np.ndarray, thresholds: Thresholds
    ) -> tuple[Detections, dict[str, float]]:
        queued = time.perf_counter()
        timings: dict[str, float] = {}

        def work() -> Detections:
            timings["queue"] = (time.perf_counter() - queued) * 1e3
            return model.predict(pixels, thresholds, timings)

        detections = await asyncio.get_running_loop().run_in_executor(self._infer, work)
        return detections, timings

    def shutdown(self) -> None:
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._infer.shutdown(wait=False, cancel_futures=True)
