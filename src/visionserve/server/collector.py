"""Pausing Python's cyclic garbage collector while a large request body is decoded.

Parsing JSON makes a list for every JSON array. While a few hundred thousand of them are
alive, each full collection (which allocation triggers, in whatever thread) walks all of
them and everything they hold, holding the GIL for a tenth of a second or more, so a
worker thread parsing a big body stalled the event loop all the same (docs/protocols.md).
The parsed lists hold no reference cycles and are freed by reference counting; the pause
lasts as long as the decoding (a second or two at most, the body being bounded).
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_pauses = 0  # decodings under way; the collector runs again when the last one ends
_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection, in the whole process, until every pause has ended."""
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()
