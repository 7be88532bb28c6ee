"""Refusing detection requests at the door when the server is full.

Protocol handlers still take their place with ``service.admit()`` (which also refuses);
this gate only makes refusal nearly free under overload: a full server answers 503 before
routing, body parsing or any handler runs, so a flood of excess requests costs little of
the CPU the accepted ones need.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, TypeVar

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from visionserve.errors import Overloaded
from visionserve.protocols import ErrorRenderer
from visionserve.runtime.scheduler import Scheduler

F = TypeVar("F", bound=Callable)


def admitted(endpoint: F) -> F:
    """Marks a route endpoint as a detection route, gated by admission control."""
    endpoint.__visionserve_admitted__ = True  # type: ignore[attr-defined]
    return endpoint


def admitted_routes(routes: Iterable[BaseRoute]) -> list[tuple[re.Pattern[str], set[str], BaseRoute]]:
    return [
        (r.path_regex, set(r.methods or ()), r)
        for r in routes
        if isinstance(r, Route) and getattr(r.endpoint, "__visionserve_admitted__", False)
    ]


class AdmissionGateMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        scheduler: Scheduler,
        routes: Callable[[], list[tuple[re.Pattern[str], set[str], BaseRoute]]],
        renderer_for: Callable[[str], ErrorRenderer],
    ) -> None:
        self.app = app
        self.scheduler = scheduler
        self.routes = routes
        self.renderer_for = renderer_for
        self._routes: list[tuple[re.Pattern[str], set[str], BaseRoute]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.scheduler.full:
            if self._routes is None:
                self._routes = self.routes()
            path, method = scope["path"], scope["method"]
            for regex, methods, route in self._routes:
                if method in methods and regex.match(path):
                    scope["route"] = route  # for the metrics' route label
                    try:
                        self.scheduler.admit().release()  # refuses (and counts it) while full
                    except Overloaded as e:
                        response = self.renderer_for(path)(e.status, e.code, e.message, e.headers)
                        await response(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)
