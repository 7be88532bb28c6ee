"""Inference workers outside the HTTP process, and the pipes that feed them.

Why not in the HTTP process: there, the HTTP event loop and the inference threads share one
GIL. Under overload (clients re-sending at once after each 503) the loop holds it most of the
time and the workers' Python/numpy steps between native calls starve (docs/benchmarks.md).
In another process the loop competes for a *core* through the OS scheduler instead.

Layout: ``inference_workers`` workers, hosted by ``runtime.inference_processes`` processes
(default one: threads in one process share the interpreter, libraries and ONNX Runtime's
state, which keeps the server's memory low; runtime/worker_process.py). Each process is a
fresh interpreter (``python -m visionserve.runtime.worker_process``), so it carries none of
the HTTP stack. Worker 0 also holds the *wide* session (all cores) that a lone request runs
on; every worker has one single-threaded session. Each worker talks to the HTTP process over
two pipes (jobs down, results up, enlarged so that a typical upload is written without
blocking); the HTTP process reads results on its event loop (``add_reader``), so no thread
sits between a worker and the loop. A job carries the encoded bytes (or pixels), placed in
shared memory rather than the pipe (runtime/shared_bytes.py), and goes through decode,
pre-processing, inference and post-processing in the worker; the small
result arrays come back, with the annotated image, drawn and encoded in the worker, when
the caller asks for one. Decoded pixels never come back.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import fcntl
import logging
import mmap
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections import deque
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from visionserve.errors import ModelError
from visionserve.runtime.session import cpu_count
from visionserve.runtime.settings import RuntimeSettings
from visionserve.runtime.shared_bytes import SharedBytes
from visionserve.runtime.worker_process import WorkerOrders
from visionserve.server.logs import JsonFormatter
from visionserve.store.manifest import ModelManifest
from visionserve.types import DecodedImage

log = logging.getLogger("visionserve.workers")

PIPE_BYTES = 1 << 20  # Linux's default ceiling for unprivileged pipe sizes
# Replies are read in pieces this big: a reply is about 1 kB unless it carries an annotated
# image, and os.read allocates its whole buffer each call (1 MB cost 11 us per reply, 64 kB 1 us).
READ_BYTES = 1 << 16
# At most this much is read per wake-up of the event loop: the worker refills the pipe as it
# is read, so a long reply (an annotated 49 MP image: tens of MB as JPEG, more as PNG) read
# in one go would hold the loop for all of it. A pipe's worth (2 ms at most per wake-up).
READ_PER_WAKEUP = PIPE_BYTES
LOAD_TIMEOUT_S = 300.0
DROP_SLOTS = 1 << 16
# Shared-memory slots for uploads (runtime/shared_bytes.py): a worker holds at most two jobs
# (scheduler.WORKER_DEPTH), so this covers batches of two; more take the pipe.
UPLOAD_SLOTS_PER_WORKER = 4

Reply = tuple[str, Any]


def _enlarge(fd: int) -> None:
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:  # not allowed or not Linux: writes just block a little longer
        pass


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path, so that the inference process finds
    the same visionserve (and libraries) as this one even when it was put on sys.path at run
    time rather than installed."""
    own = tuple({sys.prefix, sys.base_prefix})  # the interpreter's own paths: the child has them
    path = [p for p in sys.path if p and os.path.isdir(p) and not p.startswith(own)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}


def unpack_image(meta: tuple) -> DecodedImage:
    """The worker's decoded image, with a zero-byte stand-in of the same shape for its pixels,
    which stay in the worker (callers use only the sizes)."""
    width, height, fmt, shape = meta
    return DecodedImage(np.broadcast_to(np.zeros((), np.uint8), shape), width, height, fmt)


# -- in the HTTP process ----------------------------------------------------------------


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _release_then(uploads: SharedBytes, taken: list[int], callback: Callable[[Reply], None], reply: Reply) -> None:
    uploads.release(taken)
    callback(reply)


class _Worker:
    def __init__(self, index: int, process: subprocess.Popen, jobs: Connection, results: Connection) -> None:
        self.index = index
        self.process = process  # the inference process hosting it (shared by several workers)
        self.jobs = jobs
        self.results = results
        self.pending: deque[Callable[[Reply], None]] = deque()  # replies come back in order
        self.lock = threading.Lock()  # jobs (event loop) and loads (loader thread) both send
        self.alive = True
        self.inbox = bytearray()  # reply bytes read so far (the loop reads without blocking)


class WorkerPool:
    """``count`` inference workers in ``processes`` processes (0: one per worker).

    ``spawn`` starts the processes (any time: ``visionserve serve`` does it first thing, so
    they import ONNX Runtime while this process imports the HTTP stack); ``start`` connects
    them to the event loop and must run on its thread.
    """

    def __init__(self, count: int, runtime: RuntimeSettings, processes: int = 1) -> None:
        self.count = count
        self.runtime = runtime
        self.process_count = min(count, processes or count)
        self._workers: list[_Worker] = []
        self._processes: list[subprocess.Popen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.broken: str | None = None
        # One byte per job in flight, shared with the workers: set when the job's caller is
        # gone (disconnected, deadline passed), so a worker skips it if it has not begun.
        self.dropped: Any = None
        self._next_slot = 0
        self.uploads: SharedBytes | None = None  # large byte strings in jobs go through here

    @classmethod
    def for_runtime(cls, runtime: RuntimeSettings) -> "WorkerPool":
        """The pool these settings ask for: ``inference_workers`` (0: one per core) workers in
        ``inference_processes`` processes."""
        return cls(runtime.inference_workers or cpu_count(), runtime, runtime.inference_processes)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def spawn(self) -> None:
        """Starts the inference processes (once)."""
        if self._processes:
            return
        drops_fd = os.memfd_create("visionserve-drops")
        os.ftruncate(drops_fd, DROP_SLOTS)
        self.dropped = mmap.mmap(drops_fd, DROP_SLOTS)
        self.uploads = SharedBytes(UPLOAD_SLOTS_PER_WORKER * self.count)
        uploads = (self.uploads.fd, self.uploads.slots, self.uploads.slot_bytes)
        root = logging.getLogger()
        log_format = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
        log_level = logging.getLevelName(logging.getLogger("visionserve").getEffectiveLevel())
        try:
            for p in range(self.process_count):
                hosted = [i for i in range(self.count) if i % self.process_count == p]
                ends, parent_ends = [], []
                for i in hosted:
                    job_r, job_w = os.pipe()
                    res_r, res_w = os.pipe()
                    for fd in (job_w, res_w):
                        _enlarge(fd)
                    ends.append((i, job_r, res_w))
                    parent_ends.append((i, job_w, res_r))
                child_fds = [fd for _, r, w in ends for fd in (r, w)]
                proc = subprocess.Popen(
                    [sys.executable, "-m", "visionserve.runtime.worker_process"],
                    stdin=subprocess.PIPE, pass_fds=[drops_fd, self.uploads.fd, *child_fds], close_fds=True, env=_child_env(),
                )
                for fd in child_fds:
                    os.close(fd)
                assert proc.stdin is not None
                orders = WorkerOrders(ends, drops_fd, DROP_SLOTS, uploads, self.runtime, log_format, log_level)
                proc.stdin.write(pickle.dumps(orders, protocol=pickle.HIGHEST_PROTOCOL))
                proc.stdin.close()
                self._processes.append(proc)
                for i, job_w, res_r in parent_ends:
                    self._workers.append(
                        _Worker(i, proc, Connection(job_w, readable=False), Connection(res_r, writable=False))
                    )
        finally:
            os.close(drops_fd)
            self.uploads.close_fd()
        self._workers.sort(key=lambda w: w.index)
        log.debug("started %d inference workers in %d processes: %s", self.count, self.process_count, self.pids)
        # Workers ignore SIGTERM (the HTTP process drains first), so an exit that skips the
        # lifespan shutdown (a second signal) must still stop them.
        atexit.register(self.close, 1.0)

    def start(self) -> None:
        """Spawns the processes if not yet done and reads their replies on the running loop."""
        self._loop = asyncio.get_running_loop()
        self.spawn()
        for worker in self._workers:
            self._loop.add_reader(worker.results.fileno(), self._on_reply, worker)

    # -- replies (event loop thread) ---------------------------------------------------

    def _on_reply(self, worker: _Worker) -> None:
        # The event loop made the pipe non-blocking: read what is there, answer every
        # complete message (multiprocessing's framing: a 4-byte length, or -1 and 8 bytes).
        # Level-triggered: what is left past READ_PER_WAKEUP wakes the loop again.
        fd = worker.results.fileno()
        budget = READ_PER_WAKEUP
        try:
            while True:
                chunk = os.read(fd, READ_BYTES)
                if not chunk:
                    self._lost(worker)
                    return
                worker.inbox += chunk
                budget -= len(chunk)
                if len(chunk) < READ_BYTES or budget <= 0:
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
        code = worker.process.poll()
        self.broken = f"inference worker {worker.index} exited (code {code})"
        log.error("%s; its requests fail", self.broken)
        while worker.pending:
            worker.pending.popleft()(("error", ModelError(self.broken)))

    def _send(self, worker: _Worker, message: tuple, callback: Callable[[Reply], None]) -> None:
        assert self.uploads is not None, "spawn() first"
        data, taken = self.uploads.dumps(message)
        if taken:  # the slots are free again once the worker has answered (or is gone)
            callback = partial(_release_then, self.uploads, taken, callback)
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
        render, drop slot) to one worker; ``callback`` runs on the event loop with its
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
            w.jobs.close()  # end-of-file: the worker's loop returns
        for proc in self._processes:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(1)
        for w in self._workers:
            w.results.close()
        self._workers = []
        self._processes = []

