"""Logging set-up: human-readable text or one JSON object per line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time


# C0 and C1 control characters (and DEL), written as escapes: a client's path with a newline
# in it would otherwise forge a line of its own in a text log.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` (from a client: a path, say) safe to put in a log line."""
    return text.translate(_CONTROL)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _not_a_cancelled_task(record: logging.LogRecord) -> bool:
    """A forced stop (a second SIGTERM) cancels the tasks still running. uvicorn logs a
    cancelled request as an 'Exception in ASGI application' with its traceback, and the
    cancelled lifespan task's traceback as the text of an error; the request got its answer,
    and the stop is logged already."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, asyncio.CancelledError):
        return False
    if record.levelno < logging.ERROR:
        return True
    text = record.getMessage()
    return not (text.startswith("Traceback") and text.rstrip().endswith("CancelledError"))


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # On uvicorn's logger, where both are logged: not on every access-log line.
    logging.getLogger("uvicorn.error").addFilter(_not_a_cancelled_task)
    logging.getLogger("uvicorn.access").disabled = True  # our middleware writes the access log
