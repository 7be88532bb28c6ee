"""Protocol adapters: one module each, discovered at start-up.

Each module exposes ``PROTOCOL``: the URL prefix it owns, its router, and how it renders
errors. The app mounts every router found, and renders any error (including unknown
routes under a prefix) with the renderer of the longest prefix that matches the path.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from visionserve.errors import BadRequest, UnsupportedMediaType

# (status, code, message, extra headers) -> response
ErrorRenderer = Callable[[int, str, str, Mapping[str, str]], Response]


# Milliseconds the client will wait, counted from when the server received the request;
# past it the request is dropped (before inference when it has not started) and answered 504.
TIMEOUT_HEADER = "x-timeout-ms"


def positive_finite(number: int | float) -> float | None:
    """``number`` as a float when it can be a timeout: finite and above 0. None otherwise,
    including infinity, NaN and integers beyond a float's range (JSON allows any of them)."""
    try:
        value = float(number)
    except OverflowError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def header_timeout_ms(request: Request) -> float | None:
    """The request's ``X-Timeout-Ms`` (None without one); 400 unless a finite positive number."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = positive_finite(float(raw))  # float() reads "inf", "nan" and "1e400" (infinite) too
    except ValueError:
        value = None
    if value is None:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a finite number of milliseconds above 0, got {raw!r}")
    return value


def refuse_content_encoding(request: Request) -> None:
    """415 for an upload in a content coding (gzip, say): images are compressed already, and
    undone by no one it would read as a broken image (the V2 routes undo gzip and deflate)."""
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding and coding != "identity":
        raise UnsupportedMediaType(f"unsupported Content-Encoding {coding!r}: send the image as it is")


def received_at(request: Request) -> float | None:
    """When the server received the request (time.monotonic()), as the request-context
    middleware recorded it; deadlines count from there."""
    return request.scope.get("state", {}).get("received")


# Python's JSON reader turns "\ud800" escapes into lone UTF-16 surrogates, which no UTF-8
# body can carry; error messages often quote what the client sent.
_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so it can be encoded as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def _with_encodable_messages(render: ErrorRenderer) -> ErrorRenderer:
    def render_encodable(status: int, code: str, message: str, headers: Mapping[str, str]) -> Response:
        return render(status, code, encodable(message), headers)

    return render_encodable


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    prefix: str  # "" owns everything no other protocol claims
    router: APIRouter
    render_error: ErrorRenderer
    description: str = ""

    def __post_init__(self) -> None:
        # Every error of every protocol is rendered through here: a message quoting unencodable
        # client text must still give its JSON error, not a failure to render it (a 500).
        object.__setattr__(self, "render_error", _with_encodable_messages(self.render_error))


def discover() -> list[Protocol]:
    """Every protocol adapter, the one that owns no prefix (visionserve's own API) first.
    Routers are tried in that order and the first full match serves: most requests are its
    ``/predict``, and the others' routes all lie under their own prefixes, so the order
    decides no match, only how many routes a request is tried against (9 us less for
    ``/predict`` than in name order, measured)."""
    found = []
    for mod in pkgutil.iter_modules(__path__):
        proto = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "PROTOCOL", None)
        if isinstance(proto, Protocol):
            found.append(proto)
    return sorted(found, key=lambda p: (p.prefix != "", p.name))


def weights(header: str) -> dict[str, float]:
    """The quality value of each item of an Accept or Accept-Encoding header (RFC 9110
    section 12.4.2), lower-cased; 1 where none is given, 0 where it does not parse."""
    out: dict[str, float] = {}
    for part in header.split(","):
        item, *params = part.split(";")
        weight = 1.0
        for param in params:
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
                weight = min(max(weight, 0.0), 1.0) if weight == weight else 0.0  # NaN: nothing
        if item.strip():
            out[item.strip().lower()] = weight
    return out


def server_timing(timings_ms: Mapping[str, float]) -> dict[str, str]:
    """The ``Server-Timing`` header of a detection's answer: each stage's milliseconds."""
    return {"Server-Timing": ", ".join(f"{stage};dur={ms:.2f}" for stage, ms in timings_ms.items())}


def renderer_for(path: str, protocols: list[Protocol]) -> ErrorRenderer:
    best = max(
        (p for p in protocols if path == p.prefix or path.startswith(p.prefix.rstrip("/") + "/") or p.prefix == ""),
        key=lambda p: len(p.prefix),
    )
    return best.render_error
