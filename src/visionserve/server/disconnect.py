"""Dropping work whose client has gone away."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.types import Receive

from visionserve.errors import ClientDisconnected

T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    # Once the body is read, the server's receive() returns only when the client disconnects.
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Awaits ``work``; if the client disconnects first, cancels it (the scheduler then drops
    the job if it has not started), waits until it has ended, and raises ``ClientDisconnected``.

    Call only after the request body has been read.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    # Waited for: its queued work is dropped before the caller gives the request's places
    # back (a free worker could otherwise start it meanwhile).
    task.cancel()
    await asyncio.wait((task,))
    _retrieve(task)
    raise ClientDisconnected("the client disconnected before the answer")


def _abandon(task: asyncio.Future) -> None:
    """Cancels ``task``, whose outcome no one will await. A cancelled ``asyncio.gather``
    ends with a CancelledError *exception* (not cancelled), which asyncio logs as an error
    with a traceback when it is never retrieved: it is retrieved here."""
    task.cancel()
    task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
