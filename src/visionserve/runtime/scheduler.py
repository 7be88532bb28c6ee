"""Where and when detection work runs: admission, a bounded queue, deadlines, dynamic
batching, and the inference workers. Never on the event loop.

Policy (measured in docs/benchmarks.md):

* A request is *admitted* before its body is read; at most ``workers + max_queue`` are
  admitted at once, and the next one gets 503 with Retry-After at once, so accepted
  requests never wait behind an unbounded queue. An upload still arriving after
  ``upload_hold_ms`` gives its place up when another request needs it, and takes one
  again once its body is complete: slow or stalled clients cannot hold every place.
* Each job runs decode, pre-processing, inference and post-processing on one worker, so
  while one image is in the model the next one decodes on the other core. Workers are
  threads of this process by default, or run in inference processes
  (``runtime.worker_mode = "processes"``; runtime/workers.py: outside this process's GIL,
  started again when they exit). Either way a worker is handed its next job while it runs one.
* When a request is the only one admitted, it runs on the *wide* session (all cores):
  one image gets the whole machine. When several are admitted, up to ``workers`` run at
  once on the single-threaded worker sessions: several images use the cores side by side.
* Models whose graph takes a batch run up to ``max_batch_size`` queued images at once,
  waiting at most ``max_queue_delay_ms`` for the batch to fill, and only while more
  admitted requests are on their way.
* A job past its deadline is dropped (504), before inference when it has not started;
  a job whose caller is cancelled (client disconnected) is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from functools import partial
from typing import Callable, TypeVar

from visionserve.config import QueueSettings, RuntimeSettings
from visionserve.errors import DeadlineExceeded, Overloaded
from visionserve.metrics import Metrics
from visionserve.runtime.execute import Job, Outcome, execute_jobs
from visionserve.runtime.model import ServedModel
from visionserve.runtime.cpus import cpu_count, cpu_policy_in_force
from visionserve.runtime.workers import WorkerLost, WorkerPool, unpack_image
from visionserve.types import DecodedImage, Detections, Thresholds

T = TypeVar("T")
log = logging.getLogger("visionserve.scheduler")

WORKER_DEPTH = 2  # jobs handed to one worker at a time


class Ticket:
    """One admitted request. Releasing it (once) frees its places: one, or more for a
    request of several images (``Scheduler.admit(images=...)``)."""

    __slots__ = (
        "_scheduler", "_released", "_token", "claimed", "places", "receiving_since", "aside", "received_bytes",
    )

    def __init__(self, scheduler: "Scheduler") -> None:
        self._scheduler = scheduler
        self._released = False
        self._token = None
        self.claimed = False  # a reserved ticket taken by the request's handler
        self.places = 1
        self.receiving_since: float | None = None  # time.monotonic() its body began to be awaited
        self.aside = False  # a slow upload that gave its places up (Scheduler.receiving)
        self.received_bytes = 0  # body bytes so far, while it is receiving

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._leave(self)

    def __enter__(self) -> "Ticket":
        self._token = _current_ticket.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current_ticket.reset(self._token)
        self.release()


# The ticket of the request the current task serves, so that ``run`` does not admit twice.
_current_ticket: ContextVar[Ticket | None] = ContextVar("visionserve_ticket", default=None)
# A place taken for the request before routing (server/admission.py): the handler's
# ``admit()`` claims it instead of competing again with every request that arrived since.
_reserved_ticket: ContextVar[Ticket | None] = ContextVar("visionserve_reserved_ticket", default=None)


def reserve(ticket: Ticket):  # type: ignore[no-untyped-def]
    """Makes ``ticket`` the one ``Scheduler.admit`` hands out in this context; returns the
    token for ``_reserved_ticket.reset``."""
    return _reserved_ticket.set(ticket)


def unreserve(token) -> None:  # type: ignore[no-untyped-def]
    _reserved_ticket.reset(token)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[Future], None], fut: Future) -> None:
    """Calls ``callback(fut)`` on ``loop`` (from whichever thread finished ``fut``)."""
    try:
        loop.call_soon_threadsafe(callback, fut)
    except RuntimeError:
        pass  # the loop is closed: the server has stopped, and no one waits for the answer


def capacity_for(workers: int, max_queue: int | None) -> int:
    """Requests admitted at once: one running per worker, plus ``max_queue`` waiting
    (default: one per two workers, at least one; config.QueueSettings.max_queue says why)."""
    return workers + (max(1, workers // 2) if max_queue is None else max_queue)


class Scheduler:
    def __init__(
        self,
        runtime: RuntimeSettings,
        queue: QueueSettings,
        metrics: Metrics | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        """``workers``: the inference processes when the caller has started them already
        (``visionserve serve`` does, before importing the HTTP stack); else made here."""
        cores = cpu_count()
        self.workers = runtime.inference_workers or cores
        self.capacity = capacity_for(self.workers, queue.max_queue)
        self.settings = queue
        self.metrics = metrics or Metrics()
        self.processes: WorkerPool | None = None
        if runtime.worker_mode == "processes":
            self.processes = workers or WorkerPool.for_runtime(runtime)
            self.processes.on_restart = self.metrics.worker_restarts.inc
            self._load = [0] * self.workers  # jobs sent to each worker process and not answered
        # A worker gets its next job while it still runs one (depth 2), so it never waits for
        # the event loop between images: a worker thread takes it from the pool's queue, a
        # worker process from its pipe. With one job each, the threads sat idle for the loop
        # (busy with other requests) to hand them the next: depth 2 served 1-6% more at c=16
        # and 3% more at c=4 (docs/benchmarks.md).
        self._slots = self.workers * WORKER_DEPTH
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="infer")
        self._aux = ThreadPoolExecutor(runtime.decode_threads or cores, thread_name_prefix="aux")
        self._queue: deque[Job] = deque()
        self._free = self._slots  # worker slots; a wide run takes them all
        self._batch_timer: asyncio.TimerHandle | None = None
        self._in_threads: dict[int, list[Job]] = {}  # batches handed to the worker threads
        self.worker_timeout_s = runtime.worker_timeout_s
        self._stuck_logged = False
        self.admitted = 0
        self.running = 0
        # Uploads still arriving: those holding their places (oldest first), and how many
        # gave them up (``receiving``), with the bytes those have received.
        self._receiving: dict[Ticket, None] = {}
        self._rejoining: deque[asyncio.Future[None]] = deque()  # complete slow uploads waiting for a place
        self.aside = 0
        self.aside_bytes = 0
        self.draining = False
        self.metrics.watch(lambda: len(self._queue), lambda: self.admitted, self.capacity, lambda: self.aside)

    def start(self) -> None:
        """Connects the inference process(es) (worker_mode "processes"), starting them unless
        ``visionserve serve`` already has; on the event loop, before any model loads."""
        if self.processes is None:
            return
        self.processes.start()

    # -- admission ---------------------------------------------------------------------

    def admit(self, images: int = 1) -> Ticket:
        """Takes a place for one request, or raises ``Overloaded`` (503 + Retry-After) at once.

        Call it before reading the request body, so that refusing costs next to nothing.
        When the request already holds a place (taken before routing), returns that one.
        A request of several ``images`` is admitted like any other (one free place is
        enough) and then holds as many more places as are free, up to one per image: the
        images all run, and requests after it are refused while they would wait behind them.
        """
        reserved = _reserved_ticket.get()
        if reserved is not None and not reserved.claimed:
            reserved.claimed = True
            return self._widen(reserved, images)
        if self.draining:
            self.metrics.child(self.metrics.rejected, "draining").inc()
            raise Overloaded("the server is shutting down")
        # (Complete slow uploads waiting for a place, if any, come first: the server is full.)
        if (self.admitted >= self.capacity or self._rejoining) and not self._free_places_of_slow_uploads():
            raise self._refusal()
        self.admitted += 1
        return self._widen(Ticket(self), images)

    def _refusal(self) -> Overloaded:
        self.metrics.child(self.metrics.rejected, "queue_full").inc()
        return Overloaded(f"server at capacity ({self.capacity} requests in progress); retry shortly")

    def _widen(self, ticket: Ticket, images: int) -> Ticket:
        more = min(images - ticket.places, self.capacity - self.admitted)
        if more > 0:
            self.admitted += more
            ticket.places += more
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        """A released ticket's places (or its slot among the slow uploads) are free: first
        for the complete slow uploads waiting for one (``received``)."""
        if ticket.aside:
            ticket.aside = False
            self._uncharge(ticket)
        else:
            self.admitted -= ticket.places
            self._hand_over()
        if ticket.receiving_since is not None:
            ticket.receiving_since = None
            self._receiving.pop(ticket, None)
        if self._batch_timer is not None:
            self._dispatch()  # one request fewer that could join a waiting batch: it may go now

    def _hand_over(self) -> None:
        """Free places go to the complete slow uploads waiting for one, first come first."""
        while self._rejoining and self.admitted < self.capacity:
            place = self._rejoining.popleft()
            if not place.done():
                self.admitted += 1
                place.set_result(None)

    # -- uploads that arrive slowly ----------------------------------------------------
    # A request is admitted from its headers on, so that refusing costs nothing. But then
    # a client that sends headers and stalls holds a place until limits.body_timeout_s: a
    # few such clients would keep every place and the server would refuse everyone else.
    # So, only when the server is full, an upload that has been arriving for longer than
    # queue.upload_hold_ms gives its place to the newcomer and goes on arriving "aside",
    # bounded in number and bytes; with its body complete, it needs a place again, and
    # gets the next one freed before any new request does.

    def receiving(self, ticket: Ticket) -> None:
        """``ticket``'s request is about to read its body (the admission gate calls this)."""
        if not ticket._released and ticket.receiving_since is None:
            ticket.receiving_since = time.monotonic()
            self._receiving[ticket] = None

    async def received(self, ticket: Ticket) -> None:
        """``ticket``'s body is complete. An upload that went aside takes a place again: a
        free one, or, while the server is full, the next one freed, ahead of new requests, if
        that comes within ``upload_hold_ms``. Else it raises ``Overloaded`` (the request
        holds no place then)."""
        if ticket.receiving_since is None:
            return
        ticket.receiving_since = None
        self._receiving.pop(ticket, None)
        if not ticket.aside:
            return
        ticket.aside = False
        self._uncharge(ticket)
        ticket.places = 1
        # Admitted before any drain began: it may finish like the others in progress.
        if (self.admitted < self.capacity and not self._rejoining) or self._free_places_of_slow_uploads():
            self.admitted += 1
            return
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rejoining.append(place)  # behind those waiting already
        try:
            async with asyncio.timeout(self.settings.upload_hold_ms / 1e3):
                await place
        except TimeoutError:
            pass
        finally:
            handed = place.done() and not place.cancelled()
            if not handed:
                place.cancel()
                if place in self._rejoining:  # else new requests would wait behind it
                    self._rejoining.remove(place)
                ticket._released = True  # it holds no place
        if not handed:
            raise self._refusal()

    def receive_more(self, ticket: Ticket, size: int) -> None:
        """Counts ``size`` more body bytes of ``ticket``. A slow upload whose bytes take the
        slow uploads together past ``slow_upload_bytes`` is refused (``Overloaded``, and the
        connection closes: its body is not read to the end). Refused, not held back: held,
        uploads over the bound would wait for each other, and stalled ones never finish."""
        ticket.received_bytes += size
        if ticket.aside:
            self.aside_bytes += size
            if self.aside_bytes > self.settings.slow_upload_bytes:
                self.metrics.child(self.metrics.rejected, "slow_uploads").inc()
                raise Overloaded(
                    "too many slow uploads at once; retry shortly", headers={"Connection": "close"}
                )

    def _free_places_of_slow_uploads(self) -> bool:
        """Moves uploads arriving for longer than ``upload_hold_ms`` aside, oldest first, as
        far as ``max_slow_uploads`` allows, handing the places freed to the complete slow
        uploads waiting for one; whether a place is free for one more request."""
        if not self._receiving or self.aside >= self.settings.max_slow_uploads:
            return False
        since = time.monotonic() - self.settings.upload_hold_ms / 1e3
        for ticket in list(self._receiving):
            if ticket.receiving_since > since or self.aside >= self.settings.max_slow_uploads:  # type: ignore[operator]
                break  # the rest began later
            if self.aside_bytes + ticket.received_bytes > self.settings.slow_upload_bytes:
                continue  # its bytes do not fit among the slow uploads': it keeps its place
            del self._receiving[ticket]
            ticket.aside = True
            self.admitted -= ticket.places
            self.aside += 1
            self.aside_bytes += ticket.received_bytes
            self.metrics.slow_uploads.inc()
            self._hand_over()
            if self.admitted < self.capacity:
                return True
        return False

    def _uncharge(self, ticket: Ticket) -> None:
        self.aside -= 1
        self.aside_bytes -= ticket.received_bytes

    @property
    def in_progress(self) -> int:
        """Requests admitted and not answered: those holding places and the slow uploads."""
        return self.admitted + self.aside

    @property
    def idle(self) -> bool:
        return self.admitted == 0 and self.running == 0 and self.aside == 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def stuck(self) -> str | None:
        """Why the server cannot heal itself, if it cannot: a worker thread has spent longer
        than ``runtime.worker_timeout_s`` on one job (stuck in a native library, say). A
        thread cannot be stopped, so liveness fails and an orchestrator restarts the server.
        (An inference process in that state is stopped and started again: runtime/workers.py.)"""
        timeout = self.worker_timeout_s
        if timeout <= 0:
            return None
        now = time.perf_counter()
        longest = 0.0
        for jobs in list(self._in_threads.values()):
            queued_ms = jobs[0].timings.get("queue")  # set by the worker thread as it begins
            if queued_ms is not None:
                longest = max(longest, now - jobs[0].enqueued - queued_ms / 1e3)
        if longest <= timeout:
            self._stuck_logged = False
            return None
        reason = (
            f"an inference worker has spent {longest:.1f} s on one job (runtime.worker_timeout_s = {timeout:g}); "
            "a thread cannot be stopped: restart the server"
        )
        if not self._stuck_logged:  # once per episode: probes ask often
            self._stuck_logged = True
            log.error("%s", reason)
        return reason

    @property
    def down(self) -> str | None:
        """Why an inference process cannot take jobs now (it is starting again), or None."""
        return self.processes.broken if self.processes is not None else None

    def describe(self) -> dict:
        """For /status: where inference runs, and anything that keeps it from running."""
        described = {
            "mode": "processes" if self.processes else "threads", "count": self.workers,
            "cpu_policy": cpu_policy_in_force(),
        }
        if self.processes is not None:
            described |= self.processes.describe()
        else:
            described["stuck"] = self.stuck()
        return described

    # -- running detections ------------------------------------------------------------

    async def run(
        self,
        model: ServedModel,
        prepare: Callable[[], DecodedImage],
        thresholds: Thresholds,
        deadline: float | None = None,
        render: Callable[[DecodedImage, Detections], bytes] | None = None,
    ) -> tuple[Outcome, dict[str, float]]:
        """Decodes (via ``prepare``) and detects on a worker. Returns the outcome: the image
        (its pixels a stand-in when they stayed in an inference process), its detections (in
        the decoded pixels) and, given ``render``, the annotated image; and stage timings in ms."""
        if _current_ticket.get() is None:
            with self.admit():
                return await self.run(model, prepare, thresholds, deadline, render)
        loop = asyncio.get_running_loop()
        job = Job(model, prepare, thresholds, deadline, loop.create_future(), render=render)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed before it could be queued", stage="admission")
            job.timer = loop.call_later(remaining, self._expire, job)
        self._queue.append(job)
        self._dispatch()
        try:
            outcome: Outcome = await job.future
        except asyncio.CancelledError:
            self._drop(job)
            raise
        if outcome.error is not None:
            raise outcome.error
        assert outcome.image is not None and outcome.detections is not None
        return outcome, job.timings

    async def run_aux(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Runs other CPU work (e.g. decoding a large V2 JSON body) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._aux, partial(fn, *args, **kwargs))

    # -- dispatch (event loop thread only) -----------------------------------------------

    def _dispatch(self) -> None:
        waiting: set[ServedModel] = set()  # models whose partial batch waits: their jobs stay, others go on
        while self._free > 0 and self._queue:
            # The queue's head, unless its model's batch waits (then the first job of another).
            head = next((j for j in self._queue if j.model not in waiting), None) if waiting else self._queue[0]
            if head is None:
                return
            model = head.model
            if self._free == self._slots and self.admitted <= 1 and len(self._queue) == 1 and model.has_wide_session:
                self._queue.popleft()
                self._start([head], wide=True)
                continue
            if model.max_batch_size > 1:
                batch = [j for j in self._queue if j.model is model][: model.max_batch_size]
                if len(batch) < model.max_batch_size and self._worth_waiting(head):
                    waiting.add(model)
                    continue
                for j in batch:
                    self._queue.remove(j)
            else:
                self._queue.remove(head)
                batch = [head]
            self._start(batch, wide=False)

    def _worth_waiting(self, head: Job) -> bool:
        """Whether to hold a partial batch for more images: only while other admitted requests
        could still join, and not past the delay."""
        arriving = self.admitted - len(self._queue) - self.running
        waited_ms = (time.perf_counter() - head.enqueued) * 1e3
        delay = self.settings.max_queue_delay_ms
        if arriving <= 0 or waited_ms >= delay:
            return False
        if self._batch_timer is None:
            def fire() -> None:
                self._batch_timer = None
                self._dispatch()

            self._batch_timer = asyncio.get_running_loop().call_later((delay - waited_ms) / 1e3, fire)
        return True

    def _start(self, jobs: list[Job], wide: bool) -> None:
        slots = self._slots if wide else 1
        self._free -= slots
        self.running += len(jobs)
        for j in jobs:
            j.started = True
        model = jobs[0].model
        self.metrics.child(self.metrics.batch_size, model.name).observe(len(jobs))
        if self.processes is not None:  # counted when the worker says it ran (it skips dropped jobs)
            self._submit(jobs, wide, slots)
            return
        self.metrics.child(self.metrics.inference_runs, model.name, "wide" if wide else "worker").inc()
        self._in_threads[id(jobs)] = jobs
        # The worker's answer goes straight to the loop as one callback: run_in_executor would
        # chain an asyncio future to the pool's, a loop step and two callbacks more per job.
        done = self._pool.submit(execute_jobs, jobs, wide)
        done.add_done_callback(partial(_on_loop, asyncio.get_running_loop(), partial(self._finished, jobs, slots)))

    def _submit(self, jobs: list[Job], wide: bool, slots: int) -> None:
        """Hands jobs to an idle worker process (worker 0, with the wide session, for a wide run)."""
        assert self.processes is not None
        pool = self.processes
        if wide and not pool.up(0):
            wide = False  # worker 0's process is starting again: the job runs on another's single session
        if wide:
            index = 0
        else:
            # Not to a worker whose process is starting again: a job sent there fails at once,
            # which would free that worker first and draw every job to it.
            ready = [i for i in range(self.workers) if pool.up(i)]
            if not ready:
                # Every process is starting again: a job written to one now would wait behind
                # the loading of its models, however long that takes. Answered now (503).
                error = WorkerLost(f"the inference workers are starting again ({pool.broken or 'their process exited'})")
                asyncio.get_running_loop().call_soon(self._complete, jobs, slots, [Outcome(error=error) for _ in jobs])
                return
            index = min(ready, key=self._load.__getitem__)
        self._load[index] += 1
        for j in jobs:
            j.slot = self.processes.slot()
        specs = [
            (j.model.name, j.prepare, j.thresholds, j.deadline, j.enqueued, j.render, j.slot) for j in jobs
        ]
        self.processes.submit(index, specs, wide, partial(self._replied, jobs, slots, index, wide))

    def _replied(self, jobs: list[Job], slots: int, index: int, wide: bool, reply: tuple) -> None:
        self._load[index] -= 1
        status, value = reply
        if status != "ok":
            outcomes = [Outcome(error=value) for _ in jobs]
        else:
            results, ran = value
            if ran:
                self.metrics.inference_runs.labels(jobs[0].model.name, "wide" if wide else "worker").inc()
            outcomes = []
            for job, (error, meta, arrays, rendered, timings) in zip(jobs, results):
                job.timings.update(timings)
                if error is not None:
                    outcomes.append(Outcome(error=error))
                    continue
                boxes, scores, class_ids = arrays
                detections = Detections(boxes, scores, class_ids, job.model.labels)
                outcomes.append(Outcome(unpack_image(meta), detections, rendered))
        self._complete(jobs, slots, outcomes)

    def _finished(self, jobs: list[Job], slots: int, fut: Future) -> None:
        self._in_threads.pop(id(jobs), None)
        try:
            outcomes = fut.result()
        except BaseException as e:  # the executor itself failed (e.g. shut down)
            outcomes = [Outcome(error=e) for _ in jobs]
        self._complete(jobs, slots, outcomes)

    def _complete(self, jobs: list[Job], slots: int, outcomes: list[Outcome]) -> None:
        self._free += slots
        self.running -= len(jobs)
        for job, outcome in zip(jobs, outcomes):
            if job.timer is not None:
                job.timer.cancel()
            if job.future is not None and not job.future.done():
                job.future.set_result(outcome)
        self._dispatch()

    def _expire(self, job: Job) -> None:
        if job.future is None or job.future.done():
            return
        job.cancelled = True
        if job.slot is not None and self.processes is not None:
            self.processes.drop(job.slot)
        if job.started:
            # Handed to a worker: running, or next in its queue (depth 2).
            stage, message = "inference", "the request's deadline passed after it was handed to a worker"
        else:
            self._queue.remove(job)
            stage, message = "queue", "the request's deadline passed while it waited; it was dropped before inference"
        job.future.set_result(Outcome(error=DeadlineExceeded(message, stage=stage)))
        self._dispatch()

    def _drop(self, job: Job) -> None:
        """The caller went away: forget the job if it has not started."""
        job.cancelled = True
        if job.slot is not None and self.processes is not None:
            self.processes.drop(job.slot)
        if job.timer is not None:
            job.timer.cancel()
        self.metrics.cancelled.inc()
        if not job.started:
            try:
                self._queue.remove(job)
            except ValueError:
                pass
            self._dispatch()

    def shutdown(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None  # else every later release would dispatch to a pool shut down
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.close()
        self._aux.shutdown(wait=False, cancel_futures=True)
