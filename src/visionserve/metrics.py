"""Prometheus metrics of one server instance (its own registry, so several apps can coexist
in one process, as in tests).

Names follow Prometheus conventions: seconds, ``_total`` counters, base units.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, disable_created_metrics, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 1 ms .. 10 s: a detection takes ~5-50 ms on CPU; overload and big images reach seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
STAGES = ("queue", "decode", "preprocess", "inference", "postprocess", "render", "total")

CONTENT_TYPE = CONTENT_TYPE_LATEST

disable_created_metrics()  # the *_created series double the output and no dashboard uses them


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "visionserve_http_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "visionserve_http_request_duration_seconds", "HTTP request latency, first byte in to last byte out",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.stage_seconds = Histogram(
            "visionserve_stage_duration_seconds", "Time per processing stage of successful detections",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "visionserve_batch_size", "Images per inference run", ["model"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.inference_runs = Counter(
            "visionserve_inference_runs", "Inference runs by mode: wide (a lone request on all cores) or worker",
            ["model", "mode"], registry=r,
        )
        self.rejected = Counter(
            "visionserve_rejected_requests", "Requests refused with 503 before any work: queue full, draining, or too many slow uploads",
            ["reason"], registry=r,
        )
        self.deadline_exceeded = Counter(
            "visionserve_deadline_exceeded", "Requests answered 504 because their deadline passed, by where they were",
            ["stage"], registry=r,
        )
        self.cancelled = Counter(
            "visionserve_cancelled_requests", "Requests whose client went away before the answer; queued work is dropped",
            registry=r,
        )
        self.worker_restarts = Counter(
            "visionserve_inference_process_restarts",
            "Inference processes started again after they exited (runtime.worker_mode \"processes\")", registry=r,
        )
        self.queue_depth = Gauge("visionserve_queue_depth", "Requests waiting for a worker", registry=r)
        self.in_flight = Gauge("visionserve_requests_in_flight", "Detection requests admitted and not yet answered", registry=r)
        self.capacity = Gauge("visionserve_capacity", "Detection requests admitted at most at once (beyond: 503)", registry=r)
        self.slow_uploads = Counter(
            "visionserve_slow_upload_places_given_up",
            "Uploads still arriving after queue.upload_hold_ms that gave their place to a newer request", registry=r,
        )
        self.slow_uploads_now = Gauge(
            "visionserve_slow_uploads_in_progress",
            "Uploads arriving outside the capacity, having given their place up (not in requests_in_flight)",
            registry=r,
        )
        for reason in ("queue_full", "draining", "slow_uploads"):
            self.rejected.labels(reason)

    def watch(
        self, queue_depth: Callable[[], float], in_flight: Callable[[], float], capacity: float,
        slow_uploads: Callable[[], float] = lambda: 0,
    ) -> None:
        """Gauges read from the scheduler's live state at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        self.slow_uploads_now.set_function(slow_uploads)
        self.capacity.set(capacity)

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: prometheus_client checks the labels and takes a
        lock on every call, and a detection request records about ten series (its metrics
        cost 8.5 instead of 14.0 us, measured). The label sets are bounded: routes, statuses,
        models, stages."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_stages(self, model: str, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.child(self.stage_seconds, model, stage).observe(ms / 1e3)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.child(self.requests, route, method, str(status)).inc()
        self.child(self.request_seconds, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
