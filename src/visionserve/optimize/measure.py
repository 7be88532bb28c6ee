"""Measuring candidates on this machine: speed at full load and on one image, and agreement
of their detections with the float model's."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from visionserve.errors import VisionServeError, unexpected_error
from visionserve.runtime.model import ServedModel
from visionserve.runtime.cpus import cpu_count
from visionserve.runtime.session import Session, create_session
from visionserve.runtime.settings import RuntimeSettings
from visionserve.store.manifest import ModelManifest
from visionserve.types import Detections, Thresholds
from visionserve.vision.boxes import box_iou


@dataclass(frozen=True, slots=True)
class Variant:
    """A graph and the engine that runs it."""

    path: Path
    backend: str = "onnxruntime"
    options: dict[str, str] = field(default_factory=dict)

    def session(self, threads: int) -> Session:
        return create_session(
            self.path, RuntimeSettings(intra_op_threads=threads), backend=self.backend, options=self.options
        )


@dataclass(frozen=True, slots=True)
class Speed:
    throughput: float  # images/s, ``workers`` single-threaded sessions in parallel (best round)
    cpu_ms: float  # CPU time per inference inside those workers (median over rounds)
    latency_ms: float  # one image, one session using every core (median, best round)


@dataclass(frozen=True, slots=True)
class Agreement:
    matched: int  # reference detections with a same-label candidate box at IoU >= the bar
    reference: int  # detections of the float model
    candidate: int  # detections of the candidate

    @property
    def compared(self) -> int:
        """The larger count: a detection missed and one added both count against agreement."""
        return max(self.reference, self.candidate)

    @property
    def fraction(self) -> float:
        # Nothing to compare is no evidence of agreement (optimize_model refuses it up front).
        return self.matched / self.compared if self.compared else 0.0


class _Bench:
    """Sessions of one variant, created once and reused across interleaved rounds."""

    def __init__(self, variant: Variant, tensor: np.ndarray, workers: int) -> None:
        self.workers = [variant.session(1) for _ in range(workers)]
        self.wide = variant.session(cpu_count())
        self.feed = {self.wide.get_inputs()[0].name: tensor[None]}
        for s in [*self.workers, self.wide]:
            s.run(None, self.feed)

    def full_load(self, seconds: float) -> tuple[float, float]:
        """(images/s, CPU ms per inference) with every worker running flat out."""
        counts = [0] * len(self.workers)
        cpu = [0.0] * len(self.workers)
        start = threading.Barrier(len(self.workers) + 1)
        stop_at = [0.0]

        def work(i: int) -> None:
            session, feed = self.workers[i], self.feed
            start.wait()
            c0 = time.thread_time()  # one thread per session: ORT and OpenVINO run in this thread
            while time.perf_counter() < stop_at[0]:
                session.run(None, feed)
                counts[i] += 1
            cpu[i] = time.thread_time() - c0

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(self.workers))]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        stop_at[0] = t0 + seconds
        start.wait()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        done = sum(counts)
        return done / elapsed, sum(cpu) / max(done, 1) * 1e3

    def latency(self, seconds: float) -> float:
        """Median ms of one inference using all cores."""
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            self.wide.run(None, self.feed)
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3


def measure_speeds(
    variants: dict[str, Variant], tensor: np.ndarray, *, workers: int, seconds: float, rounds: int
) -> dict[str, Speed]:
    """Speed of each variant. Rounds interleave the variants so that load from other processes
    falls on all of them alike; the best round is the least disturbed one."""
    benches = {name: _Bench(variant, tensor, workers) for name, variant in variants.items()}
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, bench in benches.items():
            throughput, cpu_ms = bench.full_load(seconds)
            runs[name].append((throughput, cpu_ms, bench.latency(seconds / 2)))
    return {
        name: Speed(
            throughput=max(r[0] for r in rs),
            cpu_ms=float(np.median([r[1] for r in rs])),
            latency_ms=min(r[2] for r in rs),
        )
        for name, rs in runs.items()
    }


def served_detections(
    manifest: ModelManifest, variant: Variant, images: Sequence[np.ndarray], thresholds: Thresholds
) -> list[Detections]:
    """Detections of ``variant`` through the server's own model object (load checks included)."""
    update = {"file": str(Path(variant.path).resolve()), "backend": variant.backend, "backend_options": variant.options}
    model = ServedModel(manifest.model_copy(update=update), RuntimeSettings())
    try:
        model.load()
    except VisionServeError:
        raise
    except Exception as e:  # the engine's own: for the report (a candidate) or the terminal (the float model)
        raise unexpected_error(e, f"loading {manifest.name} on {variant.backend}", details_in=None) from None
    try:
        return [model.predict(pixels, thresholds, {}) for pixels in images]
    finally:
        model.unload()


def match_count(reference: Detections, candidate: Detections, min_iou: float) -> int:
    """Reference detections paired one-to-one with a same-label candidate at IoU >= min_iou
    (greedy, best pair first)."""
    if not len(reference) or not len(candidate):
        return 0
    iou = box_iou(reference.boxes, candidate.boxes)
    iou[reference.class_ids[:, None] != candidate.class_ids[None, :]] = 0.0
    matched = 0
    # One iteration per matched pair: detections per image are few (max_detections at most).
    while True:
        r, c = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[r, c] < min_iou:
            return matched
        matched += 1
        iou[r, :] = 0.0
        iou[:, c] = 0.0


def agreement(
    reference: Sequence[Detections], candidate: Sequence[Detections], min_iou: float = 0.8
) -> Agreement:
    return Agreement(
        matched=sum(match_count(r, c, min_iou) for r, c in zip(reference, candidate)),
        reference=sum(len(r) for r in reference),
        candidate=sum(len(c) for c in candidate),
    )
