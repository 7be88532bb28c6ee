"""Protocol adapters: one module each, discovered at start-up.

Each module exposes ``PROTOCOL``: the URL prefix it owns, its router, and how it renders
errors. The app mounts every router found, and renders any error (including unknown
routes under a prefix) with the renderer of the longest prefix that matches the path.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Mapping

from fastapi import APIRouter
from starlette.responses import Response

# (status, code, message, extra headers) -> response
ErrorRenderer = Callable[[int, str, str, Mapping[str, str]], Response]


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    prefix: str  # "" owns everything no other protocol claims
    router: APIRouter
    render_error: ErrorRenderer
    description: str = ""


def discover() -> list[Protocol]:
    found = []
    for mod in pkgutil.iter_modules(__path__):
        proto = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "PROTOCOL", None)
        if isinstance(proto, Protocol):
            found.append(proto)
    return sorted(found, key=lambda p: p.name)


def renderer_for(path: str, protocols: list[Protocol]) -> ErrorRenderer:
    best = max(
        (p for p in protocols if path == p.prefix or path.startswith(p.prefix.rstrip("/") + "/") or p.prefix == ""),
        key=lambda p: len(p.prefix),
    )
    return best.render_error
