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

An inference process that exits (killed, out of memory, a crash in a native library) is
started again and given the models it held, as gunicorn replaces a dead worker: the server
heals without a restart of its own. One whose worker spends longer than
``runtime.worker_timeout_s`` on one job is stopped, and started again the same way. Its
jobs fail (500 for the one it was running, which may be what killed it; 503 with
Retry-After for those waiting behind it); while it is down its workers take no jobs and
``/readyz`` says not ready. A process that keeps exiting soon after it starts is started
again after a growing delay (``RESTART_DELAYS_S``).
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
import time
from collections import deque
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from visionserve.errors import ModelError, Overloaded
from visionserve.runtime.cpus import cpu_count
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
LOAD_ATTEMPTS = 3  # a model load cut short by an inference process's exit is tried again
DROP_SLOTS = 1 << 16
# Shared-memory slots for uploads (runtime/shared_bytes.py): a worker holds at most two jobs
# (scheduler.WORKER_DEPTH), so this covers batches of two; more take the pipe.
UPLOAD_SLOTS_PER_WORKER = 4

# Delays before starting an inference process again, when it keeps exiting within STABLE_S
# of its start (a crash loop: a broken install, a model that kills it while loading).
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 60.0

Reply = tuple[str, Any]


class WorkerExited(ModelError):
    """The inference process exited while it ran this job (500: the job may be what killed it)."""


class WorkerLost(Overloaded):
    """The job's inference process exited before its turn, or is starting again (503)."""


def restart_delay(quick_exits: int) -> float:
    """Seconds before starting a process again after ``quick_exits`` exits in a row, each
    within STABLE_S of its start: none after one (one crash is no loop), then growing."""
    if quick_exits <= 1:
        return 0.0
    return RESTART_DELAYS_S[min(quick_exits - 2, len(RESTART_DELAYS_S) - 1)]


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


def _answer_error(worker: "_Worker", callback: Callable[[Reply], None], error: Exception) -> None:
    """Answers a request sent to ``worker`` with ``error``: its process will not."""
    try:
        callback(("error", error))
    except Exception:
        log.exception("failing a request of inference worker %d failed", worker.index)


def unpack_image(meta: tuple) -> DecodedImage:
    """The worker's decoded image, with a zero-byte stand-in of the same shape for its pixels,
    which stay in the worker (callers use only the sizes)."""
    width, height, fmt, shape, orientation = meta
    return DecodedImage(np.broadcast_to(np.zeros((), np.uint8), shape), width, height, fmt, orientation)


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
    def __init__(self, index: int, host: "_Host", jobs: Connection, results: Connection, ready: bool = True) -> None:
        self.index = index
        self.host = host  # the inference process hosting it (shared by several workers)
        self.jobs = jobs
        self.results = results
        # Replies come back in order: each one's callback, and whether it is a job (not a load).
        self.pending: deque[tuple[Callable[[Reply], None], bool]] = deque()
        self.head_since = 0.0  # time.monotonic() when the worker began on pending[0] (about)
        self.lock = threading.Lock()  # jobs (event loop) and loads (loader thread) both send
        self.alive = True
        self.ready = ready  # False while a restarted process loads its models again
        self.inbox = bytearray()  # reply bytes read so far (the loop reads without blocking)


class _Host:
    """One inference process and the workers it hosts, across its restarts."""

    def __init__(self, workers: list[int]) -> None:
        self.workers = workers  # the indexes of the workers it hosts
        self.process: subprocess.Popen | None = None
        self.started = 0.0  # time.monotonic() of the last start
        self.quick_exits = 0  # exits in a row, each soon after its start: see restart_delay
        self.down = False
        self.restart: asyncio.TimerHandle | None = None
        self.hung: int | None = None  # the worker whose job outlasted runtime.worker_timeout_s


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
        self._hosts = [
            _Host([i for i in range(count) if i % self.process_count == p]) for p in range(self.process_count)
        ]
        self._workers: list[_Worker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.broken: str | None = None  # why some worker cannot take jobs now (None: all can)
        self.restarts = 0  # inference processes started again after they exited
        self.on_restart: Callable[[], None] = lambda: None  # told of each (the server counts them)
        # Told of a model a restarted process could not load again (its name, why): the others
        # serve on, and the registry marks that one failed until a client loads it again.
        self.on_model_lost: Callable[[str, str], None] = lambda name, why: None
        self._healthy = threading.Event()  # clear from a lost process until it is back with its models
        self._healthy.set()
        # The models every worker holds, in the order they were loaded: a restarted process
        # is given them again.
        self._loaded: dict[str, tuple[ModelManifest, int]] = {}
        # One byte per job in flight, shared with the workers: set when the job's caller is
        # gone (disconnected, deadline passed), so a worker skips it if it has not begun.
        self.dropped: Any = None
        self._drops_fd = -1  # kept open for the processes started later (restarts)
        self._next_slot = 0
        self.uploads: SharedBytes | None = None  # large byte strings in jobs go through here

    @classmethod
    def for_runtime(cls, runtime: RuntimeSettings) -> "WorkerPool":
        """The pool these settings ask for: ``inference_workers`` (0: one per core) workers in
        ``inference_processes`` processes."""
        return cls(runtime.inference_workers or cpu_count(), runtime, runtime.inference_processes)

    @property
    def pids(self) -> list[int]:
        return [h.process.pid for h in self._hosts if h.process is not None]

    def describe(self) -> dict[str, Any]:
        """For /status: the processes, how often they were started again, and what is down."""
        # Running ones only: an exited process keeps its place until it starts again.
        running = [h.process.pid for h in self._hosts if h.process is not None and not h.down]
        return {"processes": running, "restarts": self.restarts, "down": self.broken}

    def up(self, index: int) -> bool:
        """Whether worker ``index`` takes jobs now (its process runs and holds the models)."""
        w = self._workers[index]
        return w.alive and w.ready

    def spawn(self) -> None:
        """Starts the inference processes (once)."""
        if self._workers:
            return
        self._drops_fd = os.memfd_create("visionserve-drops")
        os.ftruncate(self._drops_fd, DROP_SLOTS)
        self.dropped = mmap.mmap(self._drops_fd, DROP_SLOTS)
        self.uploads = SharedBytes(UPLOAD_SLOTS_PER_WORKER * self.count)
        for host in self._hosts:
            self._workers.extend(self._start_process(host, ready=True))
        self._workers.sort(key=lambda w: w.index)
        log.debug("started %d inference workers in %d processes: %s", self.count, self.process_count, self.pids)
        # Workers ignore SIGTERM (the HTTP process drains first), so an exit that skips the
        # lifespan shutdown (a second signal) must still stop them.
        atexit.register(self.close, 1.0)

    def _start_process(self, host: _Host, ready: bool) -> list[_Worker]:
        """Starts ``host``'s process, connected to new pipes; returns its workers."""
        assert self.uploads is not None
        uploads = (self.uploads.fd, self.uploads.slots, self.uploads.slot_bytes)
        root = logging.getLogger()
        log_format = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
        log_level = logging.getLevelName(logging.getLogger("visionserve").getEffectiveLevel())
        ends, parent_ends = [], []
        for i in host.workers:
            job_r, job_w = os.pipe()
            res_r, res_w = os.pipe()
            for fd in (job_w, res_w):
                _enlarge(fd)
            ends.append((i, job_r, res_w))
            parent_ends.append((i, job_w, res_r))
        child_fds = [fd for _, r, w in ends for fd in (r, w)]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "visionserve.runtime.worker_process"],
                stdin=subprocess.PIPE, pass_fds=[self._drops_fd, self.uploads.fd, *child_fds], close_fds=True,
                env=_child_env(),
            )
        except BaseException:
            for _, job_w, res_r in parent_ends:
                os.close(job_w)
                os.close(res_r)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        assert proc.stdin is not None
        orders = WorkerOrders(ends, self._drops_fd, DROP_SLOTS, uploads, self.runtime, log_format, log_level)
        try:
            proc.stdin.write(pickle.dumps(orders, protocol=pickle.HIGHEST_PROTOCOL))
            proc.stdin.close()
        except OSError:  # it exited at once: its pipes' end-of-file says so
            pass
        host.process, host.started, host.down, host.hung = proc, time.monotonic(), False, None
        return [
            _Worker(i, host, Connection(job_w, readable=False), Connection(res_r, writable=False), ready)
            for i, job_w, res_r in parent_ends
        ]

    def start(self) -> None:
        """Spawns the processes if not yet done and reads their replies on the running loop."""
        self._loop = asyncio.get_running_loop()
        self.spawn()
        for worker in self._workers:
            self._loop.add_reader(worker.results.fileno(), self._on_reply, worker)
        # Always watched: worker_timeout_s = 0 lifts the limit on jobs, not on a restart's reload.
        self._watchdog = self._loop.call_later(self._watch_period, self._watch)

    @property
    def _watch_period(self) -> float:
        if self.runtime.worker_timeout_s > 0:
            return min(1.0, self.runtime.worker_timeout_s / 4)
        return 1.0

    def _watch(self) -> None:
        """Stops an inference process whose worker has spent longer than worker_timeout_s on
        one job (stuck in a native library, say), or longer than LOAD_TIMEOUT_S loading its
        models again after a restart (a load takes longer than a job, and one asked by a
        client has that limit already): its pipes' end starts it again."""
        now = time.monotonic()
        for w in self._workers:
            host = w.host
            if not w.alive or host.down or host.hung is not None or not w.pending:
                continue
            job = w.pending[0][1]
            if not job and w.ready:
                continue  # a load by a client, not the restart's
            if job and self.runtime.worker_timeout_s <= 0:
                continue  # no limit on one job
            timeout = self.runtime.worker_timeout_s if job else LOAD_TIMEOUT_S
            if now - w.head_since > timeout and host.process is not None:
                host.hung = w.index
                log.error(
                    "inference worker %d has spent %.0f s on %s (limit %g s): stopping its process %d, which "
                    "starts again", w.index, now - w.head_since, "one job" if job else "loading its models again",
                    timeout, host.process.pid,
                )
                host.process.kill()
        assert self._loop is not None
        self._watchdog = self._loop.call_later(self._watch_period, self._watch)

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
            callback, _ = worker.pending.popleft()
            worker.head_since = time.monotonic()
            try:
                callback(reply)
            except Exception:  # one bad callback must not stall the replies behind it
                log.exception("handling a reply of inference worker %d failed", worker.index)

    def _lost(self, worker: _Worker) -> None:
        """A worker's reply pipe ended: its process exited (or is past saving). Fails the jobs
        of every worker it hosts and starts it again."""
        host = worker.host
        if host.down or self._closing:
            return
        host.down = True
        self._healthy.clear()
        process = host.process
        assert process is not None
        if process.poll() is None:
            process.kill()  # one pipe of it broke: the rest of it cannot be trusted either
        try:
            code: int | None = process.wait(2)
        except subprocess.TimeoutExpired:
            code = None
        failed = [self._workers[i] for i in host.workers]
        for w in failed:
            if self._loop is not None and not w.results.closed:
                self._loop.remove_reader(w.results.fileno())
            with w.lock:  # not while another thread writes to it
                w.alive = False
                w.jobs.close()
            w.results.close()
        lived = time.monotonic() - host.started
        host.quick_exits = host.quick_exits + 1 if lived < STABLE_S else 1
        delay = restart_delay(host.quick_exits)
        self.broken = f"inference process {process.pid} exited (code {code})"
        log.error(
            "%s after %.1f s; its requests fail and it starts again%s", self.broken, lived,
            f" in {delay:g} s" if delay else "",
        )
        for w in failed:
            running = True  # replies come in order: the first pending job is the one it was on
            while w.pending:
                if running and host.hung == w.index:
                    error: Exception = WorkerExited(
                        f"the inference worker spent longer than {self.runtime.worker_timeout_s:g} s on this request "
                        "(runtime.worker_timeout_s); its process was stopped and starts again"
                    )
                elif running:
                    error = WorkerExited(f"the inference worker exited while running this request ({self.broken})")
                else:
                    error = WorkerLost("the inference worker exited before this request's turn; it is starting again")
                running = False
                _answer_error(w, w.pending.popleft()[0], error)
        if self._loop is not None:
            host.restart = self._loop.call_later(delay, self._restart, host)

    def _restart(self, host: _Host) -> None:
        """Starts ``host``'s process again and loads its models; its workers take jobs once
        every load has answered."""
        host.restart = None
        if self._closing:
            return
        try:
            workers = self._start_process(host, ready=not self._loaded)
        except OSError as e:
            host.quick_exits += 1
            delay = restart_delay(host.quick_exits)
            log.error("could not start the inference process again (%s); trying again in %g s", e, delay)
            assert self._loop is not None
            host.restart = self._loop.call_later(delay, self._restart, host)
            return
        self.restarts += 1
        self.on_restart()
        assert self._loop is not None
        for w in workers:
            self._workers[w.index] = w
            self._loop.add_reader(w.results.fileno(), self._on_reply, w)
        loads = list(self._loaded.values())
        if not loads:
            self._healed(host)
            return
        waiting = len(loads) * len(workers)
        process = host.process

        def loaded(name: str, reply: Reply) -> None:
            nonlocal waiting
            if host.process is not process or host.down:
                return  # that process is gone already
            status, value = reply
            if status != "ok":
                if isinstance(value, (WorkerExited, WorkerLost)):
                    return  # the process went while loading: it starts again anyway
                # That model only (its file gone or changed, say): the others serve on.
                why = getattr(value, "message", None) or str(value)
                log.error("inference process %d could not load model %s again: %s", process.pid, name, why)
                if self._loaded.pop(name, None) is not None:
                    self.on_model_lost(name, why)
            waiting -= 1
            if waiting == 0:
                for w in workers:
                    w.ready = True
                self._healed(host)

        for w in workers:
            for manifest, max_batch_size in loads:
                self._send(w, ("load", manifest, max_batch_size), partial(loaded, manifest.name))

    def _healed(self, host: _Host) -> None:
        assert host.process is not None
        log.info(
            "inference process %d started again (restart %d), with %s", host.process.pid, self.restarts,
            ", ".join(self._loaded) or "no models",
        )
        if not any(h.down for h in self._hosts) and all(w.ready for w in self._workers):
            self.broken = None
            self._healthy.set()

    def _send(self, worker: _Worker, message: tuple, callback: Callable[[Reply], None]) -> None:
        assert self.uploads is not None, "spawn() first"
        data, taken = self.uploads.dumps(message)
        if taken:  # the slots are free again once the worker has answered (or is gone)
            callback = partial(_release_then, self.uploads, taken, callback)
        job = message[0] == "run"
        if len(data) > PIPE_BYTES // 2 and self._loop is not None and _on_loop(self._loop):
            # Would block the event loop until the worker, maybe busy, reads it: write it
            # from a thread (replies still match: callbacks queue in the order of writing).
            self._loop.run_in_executor(None, self._write, worker, data, callback, job)
            return
        self._write(worker, data, callback, job)

    def _write(self, worker: _Worker, data: bytes, callback: Callable[[Reply], None], job: bool) -> None:
        with worker.lock:
            if worker.alive:
                if not worker.pending:
                    worker.head_since = time.monotonic()
                worker.pending.append((callback, job))
                try:
                    worker.jobs.send_bytes(data)
                    return
                except OSError:  # its process is gone; the loop learns it from the reply pipe's end
                    worker.pending.pop()
                    self._healthy.clear()
        # Answered later on the event loop, as a real reply would be (never re-entering the caller).
        if self._closing:
            error: Exception = ModelError(f"inference worker {worker.index} has stopped")
        else:  # its process exited and starts again
            error = WorkerLost(f"inference worker {worker.index} is starting again ({self.broken or 'its process exited'})")
        failure = ("error", error)
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
        for attempt in range(LOAD_ATTEMPTS):
            try:
                answer = self._call_all(("load", manifest, max_batch_size))[0]
                break
            except (WorkerExited, WorkerLost):
                # A process exited under the load (perhaps killed: out of memory at start-up):
                # once it is back, load again, rather than leave the model failed for good.
                if attempt == LOAD_ATTEMPTS - 1 or self._closing:
                    raise
                log.warning("an inference process exited while %s loaded; loading it again once it is back", manifest.name)
                if not self._healthy.wait(LOAD_TIMEOUT_S):
                    raise
        self._loaded.pop(manifest.name, None)  # a reload: last in the order of loading
        self._loaded[manifest.name] = (manifest, max_batch_size)
        return answer

    def unload(self, name: str) -> None:
        self._loaded.pop(name, None)
        for w in self._workers:
            self._send(w, ("unload", name), lambda reply: None)

    def close(self, timeout: float = 2.0) -> None:
        """Stops the inference processes: each is told to end (end of its job pipe) and killed
        if, ``timeout`` seconds from now, it has not (stuck in a job, or stopped)."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for host in self._hosts:
            if host.restart is not None:
                host.restart.cancel()
                host.restart = None
        for w in self._workers:
            if w.alive and self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(w.results.fileno())
                except (ValueError, OSError, RuntimeError):
                    pass
            w.alive = False
            w.jobs.close()  # end-of-file: the worker's loop returns
            # No reply will come: answer what waits for one, or a model load under way (the
            # loader thread waits up to LOAD_TIMEOUT_S) would hold the exit until then.
            with w.lock:
                waiting = [callback for callback, _ in w.pending]
                w.pending.clear()
            for callback in waiting:
                _answer_error(w, callback, ModelError("the server is stopping"))
        deadline = time.monotonic() + timeout  # one wait for them all, not one each
        for host in self._hosts:
            if host.process is None:
                continue
            try:
                host.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                host.process.kill()
                host.process.wait(1)
            host.process = None
        for w in self._workers:
            w.results.close()
        self._workers = []
        if self._drops_fd >= 0:
            os.close(self._drops_fd)
            self._drops_fd = -1
            assert self.uploads is not None
            self.uploads.close_fd()
