"""How the HTTP process reads the inference workers' replies (runtime/workers.py), with a
real pipe and no worker process: a long reply must not be read in one wake-up of the loop."""

from __future__ import annotations

import fcntl
import os
import pickle
import termios
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import pytest

from visionserve.runtime import workers
from visionserve.runtime.settings import RuntimeSettings


def _buffered(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


def test_a_long_reply_is_read_over_several_wakeups_of_the_loop(monkeypatch):
    """A reply with an annotated image can be tens of MB, and the worker refills the pipe as
    it is read: read until the pipe runs dry, it held the event loop for the whole transfer."""
    cap = 128 << 10
    monkeypatch.setattr(workers, "READ_PER_WAKEUP", cap)
    r, w = os.pipe()
    workers._enlarge(w)
    if fcntl.fcntl(w, 1032) < 4 * cap:  # F_GETPIPE_SZ: the pipe could not be enlarged
        pytest.skip("pipe too small to hold more than one wake-up's reading")
    os.set_blocking(r, False)
    pixels = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8)
    sender = threading.Thread(
        target=Connection(w, readable=False).send_bytes, args=(pickle.dumps(("ok", pixels)),), daemon=True
    )
    sender.start()
    pool = workers.WorkerPool(1, RuntimeSettings())
    worker = workers._Worker(0, None, None, Connection(r, writable=False))  # type: ignore[arg-type]
    replies: list = []
    worker.pending.append((replies.append, True))

    deadline = time.monotonic() + 10
    while _buffered(r) < 4 * cap and time.monotonic() < deadline:  # the sender has filled the pipe
        time.sleep(0.01)
    reads = 0
    while not replies and time.monotonic() < deadline:
        before = len(worker.inbox)
        pool._on_reply(worker)
        reads += 1
        if not replies:
            assert len(worker.inbox) - before <= cap + workers.READ_BYTES
    sender.join(10)
    assert replies and replies[0][0] == "ok" and np.array_equal(replies[0][1], pixels)
    assert reads > (3 << 20) // (cap + workers.READ_BYTES)
    assert worker.alive and not worker.inbox
