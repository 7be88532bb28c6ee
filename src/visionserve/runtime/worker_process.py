"""The inference process: where worker loops run when ``runtime.worker_mode = "processes"``.

Started by ``WorkerPool`` (runtime/workers.py) as ``python -m visionserve.runtime.worker_process``
with its pipes passed as inherited file descriptors and its orders pickled on stdin. It is
a fresh interpreter, not a fork of the HTTP process, so it holds only what inference needs
(NumPy, ONNX Runtime, OpenCV, the image decoders) and none of the HTTP stack.

One process hosts one or more workers, each a thread with its own pipes and its own ONNX
Runtime sessions. Native calls (JPEG decode, resize, inference) release the interpreter
lock, so threads in one process keep the cores as busy as one process per worker while the
interpreter, libraries and ONNX Runtime's own state exist once (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import mmap
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from visionserve.errors import ModelError, ModelNotReady, VisionServeError, unexpected_error
from visionserve.runtime.cpus import use_thread_settings
from visionserve.runtime.settings import RuntimeSettings
from visionserve.runtime.shared_bytes import SharedBytesReader
from visionserve.server.logs import configure_logging
from visionserve.types import DecodedImage

log = logging.getLogger("visionserve.workers")

PRELOAD = ("onnxruntime", "cv2", "visionserve.imaging.decode", "visionserve.runtime.model", "visionserve.runtime.execute")


@dataclass(frozen=True)
class WorkerOrders:
    """What the HTTP process tells a new inference process (pickled on its stdin)."""

    workers: list[tuple[int, int, int]]  # (worker index, job pipe fd to read, result pipe fd to write)
    drops_fd: int  # memfd of one flag byte per job in flight
    drop_slots: int
    uploads: tuple[int, int, int]  # memfd, slots and slot size of runtime/shared_bytes.py
    runtime: RuntimeSettings
    log_format: str  # "text" or "json", as the HTTP process logs
    log_level: str


def portable_error(e: BaseException, loading: bool = False) -> BaseException:
    """An exception that survives pickling (our own errors do; others become a ModelError).
    ``loading``: the error of a model load, whose message clients see in the model's status,
    so the exception's text (which may name files) goes to the detail, for the log."""
    if isinstance(e, VisionServeError):
        return e
    if loading:
        return unexpected_error(e, "loading the model")
    return ModelError(f"inference failed: {type(e).__name__}: {e}")


def pack(outcome: Any, timings: dict[str, float]) -> tuple:
    """A job's outcome as plain values: the image's sizes (its pixels stay here), the
    detections' arrays and the annotated image when the job asked for one."""
    if outcome.error is not None:
        return (portable_error(outcome.error), None, None, None, timings)
    image: DecodedImage = outcome.image
    d = outcome.detections
    meta = (image.width, image.height, image.format, image.pixels.shape, image.orientation)
    return (None, meta, (d.boxes, d.scores, d.class_ids), outcome.rendered, timings)


def _release_free_heap() -> None:
    """Hands memory freed after loading (graph optimisation's scratch) back to the OS:
    glibc keeps it otherwise, and it would count in the process's resident size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def serve_worker(
    index: int,
    runtime: RuntimeSettings,
    jobs: Connection,
    results: Connection,
    dropped: mmap.mmap,
    uploads: SharedBytesReader,
) -> None:
    """One worker: reads jobs from its pipe until end-of-file, answers each in order."""
    from visionserve.runtime.model import ServedModel
    from visionserve.runtime.execute import Job, execute_jobs

    models: dict[str, ServedModel] = {}
    while True:
        try:
            message = uploads.loads(jobs.recv_bytes())
        except (EOFError, OSError):
            return
        op = message[0]
        try:
            if op == "run":
                _, specs, wide = message
                batch = []
                for name, prepare, thresholds, deadline, enqueued, render, slot in specs:
                    model = models.get(name)
                    if model is None:
                        raise ModelNotReady(f"model {name!r} is not loaded in worker {index}")
                    job = Job(model, prepare, thresholds, deadline, None, enqueued, render=render)  # type: ignore[arg-type]
                    job.cancelled = bool(dropped[slot])  # its caller went away while it waited here
                    batch.append(job)
                outcomes = execute_jobs(batch, wide)
                ran = any("inference" in job.timings for job in batch)
                reply: tuple = ("ok", ([pack(o, job.timings) for o, job in zip(outcomes, batch)], ran))
            elif op == "load":
                _, manifest, max_batch_size = message
                model = ServedModel(manifest, runtime, max_batch_size=max_batch_size, sessions=1, wide=index == 0)
                model.load()
                models[manifest.name] = model
                _release_free_heap()
                reply = ("ok", model.report())
            elif op == "unload":
                gone = models.pop(message[1], None)
                if gone is not None:
                    gone.unload()
                    _release_free_heap()
                reply = ("ok", None)
            else:
                reply = ("error", ModelError(f"unknown worker command {op!r}"))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            reply = ("error", portable_error(e, loading=op == "load"))
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an unpicklable exception inside an outcome
            data = pickle.dumps(("error", portable_error(e)), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            results.send_bytes(data)
        except OSError:
            return


def main() -> None:
    # The HTTP process decides when workers stop (after draining): it closes their job pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    orders: WorkerOrders = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    configure_logging(orders.log_format, orders.log_level)
    use_thread_settings(orders.runtime)
    dropped = mmap.mmap(orders.drops_fd, orders.drop_slots)
    os.close(orders.drops_fd)
    uploads_fd, upload_slots, slot_bytes = orders.uploads
    uploads = SharedBytesReader(uploads_fd, upload_slots, slot_bytes)
    os.close(uploads_fd)
    # Everything a job needs, imported now (while the HTTP process starts), not on the first load.
    for module in PRELOAD:
        importlib.import_module(module)
    threads = [
        threading.Thread(
            target=serve_worker,
            args=(
                index, orders.runtime, Connection(job_fd, writable=False), Connection(result_fd, readable=False),
                dropped, uploads,
            ),
            name=f"visionserve-infer-{index}",
        )
        for index, job_fd, result_fd in orders.workers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
