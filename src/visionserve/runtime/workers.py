"""Inference worker processes: each with its own interpreter lock and ONNX Runtime sessions.

Why processes: in one process, the HTTP event loop and the inference threads share one GIL.
Under overload (clients re-sending at once after each 503) the loop holds it most of the
time and the workers' Python/numpy steps between native calls starve (docs/benchmarks.md).
With workers in their own processes the loop competes for a *core* through the OS
scheduler. (Lowering the HTTP process's priority was measured and did not help: the workers
wait on it; docs/benchmarks.md.)

Layout: the HTTP process forks ``workers`` processes before it loads any model (the forks
share the already imported libraries' pages). Worker 0 also holds the *wide* session (all
cores) that a lone request runs on; every worker has one single-threaded session. Each
worker talks to the HTTP process over two pipes (jobs down, results up, enlarged so that a
typical upload is written without blocking); the HTTP process reads results on its event
loop (``add_reader``), so no thread sits between a worker and the loop. A job carries the
encoded bytes (or pixels) and goes through decode, pre-processing, inference and
post-processing in the worker; the small result arrays come back, and decoded pixels only
when the caller asks for them (annotated images).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import fcntl
import logging
import multiprocessing as mp
import os
import pickle
import signal
import struct
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from visionserve.config import RuntimeSettings
from visionserve.errors import ModelError, ModelNotReady, VisionServeError
from visionserve.store.manifest import ModelManifest
from visionserve.types import DecodedImage

log = logging.getLogger("visionserve.workers")

PIPE_BYTES = 1 << 20  # Linux's default ceiling for unprivileged pipe sizes
LOAD_TIMEOUT_S = 300.0
DROP_SLOTS = 1 << 16

Reply = tuple[str, Any]


def _enlarge(conn: Connection) -> None:
    try:
        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:  # not allowed or not Linux: writes just block a little longer
        pass


# -- in the worker process --------------------------------------------------------------


def _portable_error(e: BaseException) -> BaseException:
    """An exception that survives pickling (our own errors do; others become a ModelError)."""
    if isinstance(e, VisionServeError):
        return e
    return ModelError(f"inference failed: {type(e).__name__}: {e}")


def _worker_main(
    index: int,
    runtime: RuntimeSettings,
    jobs: Connection,
    results: Connection,
    inherited: list[Connection],
    dropped: Any,
) -> None:
    # The HTTP process's ends of this worker's pipes and of earlier workers' are open here
    # too (fork), and a job pipe reaches end-of-file (the signal to stop) only when every
    # copy of its writer is closed.
    for conn in inherited:
        conn.close()
    # The HTTP process decides when workers stop (after draining): closing the job pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    from visionserve.runtime.model import ServedModel
    from visionserve.runtime.scheduler import Job, execute_jobs

    models: dict[str, ServedModel] = {}
    while True:
        try:
            message = pickle.loads(jobs.recv_bytes())
        except (EOFError, OSError):
            return
        op = message[0]
        try:
            if op == "run":
                _, specs, wide = message
                batch = []
                for name, prepare, thresholds, deadline, enqueued, _keep, slot in specs:
                    model = models.get(name)
                    if model is None:
                        raise ModelNotReady(f"model {name!r} is not loaded in worker {index}")
                    job = Job(model, prepare, thresholds, deadline, None, enqueued)  # type: ignore[arg-type]
                    job.cancelled = bool(dropped[slot])  # its caller went away while it waited here
                    batch.append(job)
                outcomes = execute_jobs(batch, wide)
                ran = any("inference" in job.timings for job in batch)
                reply: Reply = ("ok", ([_pack(o, spec[5], job.timings) for o, spec, job in zip(outcomes, specs, batch)], ran))
            elif op == "load":
                _, manifest, max_batch_size = message
                model = ServedModel(manifest, runtime, max_batch_size=max_batch_size, sessions=1, wide=index == 0)
                model.load()
                models[manifest.name] = model
                reply = ("ok", {"max_batch_size": model.max_batch_size, "has_wide_session": model.has_wide_session})
            elif op == "unload":
                gone = models.pop(message[1], None)
                if gone is not None:
                    gone.unload()
                reply = ("ok", None)
            else:
                reply = ("error", ModelError(f"unknown worker command {op!r}"))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            reply = ("error", _portable_error(e))
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an unpicklable exception inside an outcome
            data = pickle.dumps(("error", _portable_error(e)), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            results.send_bytes(data)
        except OSError:
            return


def _pack(outcome, keep_pixels: bool, timings: dict[str, float]) -> tuple:  # type: ignore[no-untyped-def]
    """A job's outcome as plain values: the decoded pixels travel only when asked for."""
    if outcome.error is not None:
        return (_portable_error(outcome.error), None, None, timings)
    image: DecodedImage = outcome.image
    d = outcome.detections
    meta = image if keep_pixels else (image.width, image.height, image.format, image.pixels.shape)
    return (None, meta, (d.boxes, d.scores, d.class_ids), timings)


def unpack_image(meta: DecodedImage | tuple) -> DecodedImage:
    """The worker's decoded image; without its pixels, a zero-byte stand-in of the same shape
    (callers use only the sizes)."""
    if isinstance(meta, DecodedImage):
        return meta
    width, height, fmt, shape = meta
    return DecodedImage(np.broadcast_to(np.zeros((), np.uint8), shape), width, height, fmt)


# -- in the HTTP process ----------------------------------------------------------------


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _Worker:
    def __init__(self, index: int, process: mp.process.BaseProcess, jobs: Connection, results: Connection) -> None:
        self.index = index
        self.process = process
        self.jobs = jobs
        self.results = results
        self.pending: deque[Callable[[Reply], None]] = deque()  # replies come back in order
        self.lock = threading.Lock()  # jobs (event loop) and loads (loader thread) both send
        self.alive = True
        self.inbox = bytearray()  # reply bytes read so far (the loop reads without blocking)


class WorkerPool:
    """``count`` forked inference processes; ``start`` must run on the event loop thread."""

    def __init__(self, count: int, runtime: RuntimeSettings) -> None:
        self.count = count
        self.runtime = runtime
        self._workers: list[_Worker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.broken: str | None = None
        # One byte per job in flight, shared with the workers: set when the job's caller is
        # gone (disconnected, deadline passed), so a worker skips it if it has not begun.
        self.dropped: Any = None
        self._next_slot = 0

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("fork")  # shares the imported libraries; no threads run yet
        self.dropped = ctx.RawArray("b", DROP_SLOTS)
        for i in range(self.count):
            job_r, job_w = ctx.Pipe(duplex=False)
            res_r, res_w = ctx.Pipe(duplex=False)
            for c in (job_w, res_w):
                _enlarge(c)
            proc = ctx.Process(
                target=_worker_main,
                args=(i, self.runtime, job_r, res_w,
                      [job_w, res_r, *(c for w in self._workers for c in (w.jobs, w.results))], self.dropped),
                name=f"visionserve-infer-{i}", daemon=True
            )
            proc.start()
            job_r.close()
            res_w.close()
            worker = _Worker(i, proc, job_w, res_r)
            self._workers.append(worker)
            self._loop.add_reader(res_r.fileno(), self._on_reply, worker)
        log.debug("started %d inference worker processes: %s", self.count, self.pids)
        # Workers ignore SIGTERM (the HTTP process drains first), so an exit that skips the
        # lifespan shutdown (a second signal) must still stop them, before multiprocessing's
        # own exit handler waits for them (atexit runs the later registration first).
        atexit.register(self.close, 1.0)

    # -- replies (event loop thread) ---------------------------------------------------

    def _on_reply(self, worker: _Worker) -> None:
        # The event loop made the pipe non-blocking: read what is there, answer every
        # complete message (multiprocessing's framing: a 4-byte length, or -1 and 8 bytes).
        fd = worker.results.fileno()
        try:
            while True:
                chunk = os.read(fd, PIPE_BYTES)
                if not chunk:
                    self._lost(worker)
                    return
                worker.inbox += chunk
                if len(chunk) < PIPE_BYTES:
                    break
        except BlockingIOError:
            pass
        except OSError:
            self._lost(worker)
            return
        inbox = worker.inbox
        while len(inbox) >= 4:
            (size,) = struct.unpack_from("!i", inbox)
            start = 4
            if size == -1:
                if len(inbox) < 12:
                    return
                (size,) = struct.unpack_from("!Q", inbox, 4)
                start = 12
            if len(inbox) < start + size:
                return
            reply: Reply = pickle.loads(memoryview(inbox)[start : start + size])
            del inbox[: start + size]
            try:
                worker.pending.popleft()(reply)
            except Exception:  # one bad callback must not stall the replies behind it
                log.exception("handling a reply of inference worker %d failed", worker.index)

    def _lost(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        if self._loop is not None:
            self._loop.remove_reader(worker.results.fileno())
        code = worker.process.exitcode
        self.broken = f"inference worker {worker.index} exited (code {code})"
        log.error("%s; its requests fail", self.broken)
        while worker.pending:
            worker.pending.popleft()(("error", ModelError(self.broken)))

    def _send(self, worker: _Worker, message: tuple, callback: Callable[[Reply], None]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > PIPE_BYTES // 2 and self._loop is not None and _on_loop(self._loop):
            # Would block the event loop until the worker, maybe busy, reads it: write it
            # from a thread (replies still match: callbacks queue in the order of writing).
            self._loop.run_in_executor(None, self._write, worker, data, callback)
            return
        self._write(worker, data, callback)

    def _write(self, worker: _Worker, data: bytes, callback: Callable[[Reply], None]) -> None:
        with worker.lock:
            if worker.alive:
                worker.pending.append(callback)
                try:
                    worker.jobs.send_bytes(data)
                    return
                except OSError:
                    worker.pending.pop()
        # Answered later on the event loop, as a real reply would be (never re-entering the caller).
        failure = ("error", ModelError(self.broken or f"inference worker {worker.index} is gone"))
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, failure)
        else:
            callback(failure)

    # -- jobs --------------------------------------------------------------------------

    def slot(self) -> int:
        """A drop flag for a new job (ring; admission keeps far fewer jobs in flight)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % DROP_SLOTS
        self.dropped[slot] = 0
        return slot

    def drop(self, slot: int) -> None:
        self.dropped[slot] = 1

    def submit(self, index: int, specs: list[tuple], wide: bool, callback: Callable[[Reply], None]) -> None:
        """Sends a batch of jobs (model name, prepare, thresholds, deadline, enqueued,
        keep_pixels, drop slot) to one worker; ``callback`` runs on the event loop with its
        reply: ("ok", (per-job results, whether inference ran)) or ("error", exception)."""
        self._send(self._workers[index], ("run", specs, wide), callback)

    # -- models (any thread but the event loop's) ------------------------------------

    def _call_all(self, message: tuple) -> list[Any]:
        futures = []
        for w in self._workers:
            f: concurrent.futures.Future = concurrent.futures.Future()
            futures.append(f)
            self._send(w, message, f.set_result)
        answers = []
        for f in futures:
            status, value = f.result(LOAD_TIMEOUT_S)
            if status != "ok":
                raise value
            answers.append(value)
        return answers

    def load(self, manifest: ModelManifest, max_batch_size: int) -> dict[str, Any]:
        """Loads and warms a model in every worker; returns what the wide worker reports."""
        if not self._workers:
            raise ModelError("the inference workers are not running")
        return self._call_all(("load", manifest, max_batch_size))[0]

    def unload(self, name: str) -> None:
        for w in self._workers:
            self._send(w, ("unload", name), lambda reply: None)

    def close(self, timeout: float = 5.0) -> None:
        for w in self._workers:
            if w.alive and self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(w.results.fileno())
                except (ValueError, OSError, RuntimeError):
                    pass
            w.alive = False
            w.jobs.close()
        for w in self._workers:
            w.process.join(timeout)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1)
            w.results.close()
        self._workers = []
