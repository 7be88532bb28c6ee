"""A worker's work on a batch of jobs: decode, pre-process, one inference, post-process,
and for a job that asks, its annotated image drawn and encoded.

Runs on a scheduler thread (worker_mode "threads") or in the inference process; kept apart
from the scheduler so that the inference process imports none of the HTTP side.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from visionserve.errors import DeadlineExceeded
from visionserve.runtime.model import ServedModel
from visionserve.types import DecodedImage, Detections, Thresholds


@dataclass(eq=False, slots=True)
class Job:
    model: ServedModel
    prepare: Callable[[], DecodedImage]  # decodes on the worker (or returns ready pixels)
    thresholds: Thresholds
    deadline: float | None  # time.monotonic()
    future: asyncio.Future | None  # None in a worker process
    enqueued: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    started: bool = False
    cancelled: bool = False  # read by the worker thread: skip if not begun
    timer: asyncio.TimerHandle | None = None
    # Draws the detections (in the decoded pixels) on the image and encodes it, on the worker:
    # the pixels (147 MB for a 49 MP photo) then never cross to the HTTP process.
    render: Callable[[DecodedImage, Detections], bytes] | None = None
    slot: int | None = None  # its drop flag in the worker processes


@dataclass(slots=True)
class Outcome:
    image: DecodedImage | None = None
    detections: Detections | None = None
    rendered: bytes | None = None  # the job's annotated image, when it asked for one
    error: BaseException | None = None


def execute_jobs(jobs: list[Job], wide: bool) -> list[Outcome]:
    """On a worker thread or process: decode and pre-process each image, run them as one batch, post-process."""
    model = jobs[0].model
    outcomes = [Outcome() for _ in jobs]
    ready: list[int] = []
    tensors = []
    placements = []
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        job.timings["queue"] = (t0 - job.enqueued) * 1e3
        try:
            if job.cancelled:
                raise DeadlineExceeded("dropped")  # its caller is gone or timed out: result unused
            if job.deadline is not None and time.monotonic() >= job.deadline:
                raise DeadlineExceeded("the request's deadline passed before inference; it was dropped")
            image = job.prepare()
            t1 = time.perf_counter()
            tensor, placement = model.family.preprocess(image.pixels)
            t2 = time.perf_counter()
        except BaseException as e:
            outcomes[i].error = e
            continue
        job.timings["decode"] = (t1 - t0) * 1e3
        job.timings["preprocess"] = (t2 - t1) * 1e3
        outcomes[i].image = image
        ready.append(i)
        tensors.append(tensor)
        placements.append(placement)
    if not ready:
        return outcomes
    t2 = time.perf_counter()
    batch = tensors[0][None] if len(tensors) == 1 else np.stack(tensors)
    try:
        outputs = model.run(batch, wide=wide)
    except BaseException as e:
        for i in ready:
            outcomes[i].error = e
        return outcomes
    t3 = time.perf_counter()
    for k, i in enumerate(ready):
        job, image = jobs[i], outcomes[i].image
        assert image is not None
        t4 = time.perf_counter()
        job.timings["inference"] = (t3 - t2) * 1e3
        try:
            h, w = image.pixels.shape[:2]
            detections = model.family.postprocess([o[k] for o in outputs], placements[k], (w, h), job.thresholds)
            t5 = time.perf_counter()
            job.timings["postprocess"] = (t5 - t4) * 1e3
            if job.render is not None:
                outcomes[i].rendered = job.render(image, detections)
                job.timings["render"] = (time.perf_counter() - t5) * 1e3
            outcomes[i].detections = detections
        except BaseException as e:
            outcomes[i].error = e
    return outcomes
