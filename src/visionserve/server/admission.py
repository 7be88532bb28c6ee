"""Admission at the door: a detection request takes its place before routing.

Protocol handlers still call ``service.admit()`` (which refuses when full); this gate takes
the place earlier, before routing, body parsing or any handler runs, and hands it to the
handler's ``admit()``. So a full server refuses for nearly free, and when a place frees up
only one of the requests that arrived meanwhile goes on (the others are refused here, not
after reading their bodies). The HTTP protocol of ``visionserve serve`` takes the place even
earlier, right after the headers (server/refusal.py), and passes it in the scope's state.
The gate also tells the scheduler when the body is complete: until then a slow upload may
give its place up to a newer request (runtime/scheduler.py, ``receiving``).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, TypeVar

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionserve.errors import Overloaded
from visionserve.protocols import ErrorRenderer
from visionserve.runtime.scheduler import Scheduler, Ticket, reserve, unreserve

F = TypeVar("F", bound=Callable)

RESERVED = "visionserve_ticket"  # scope["state"] key of a place taken by the HTTP protocol


def admitted(endpoint: F) -> F:
    """Marks a route endpoint as a detection route, gated by admission control."""
    endpoint.__visionserve_admitted__ = True  # type: ignore[attr-defined]
    return endpoint


class AdmittedRoutes:
    """The detection routes (those marked ``@admitted``) among ``routes``, matched by method
    and path.

    Collected on first use: the route lists are complete only once the app is built.
    """

    def __init__(self, routes: Callable[[], Iterable[BaseRoute]]) -> None:
        self._routes = routes
        self._table: list[tuple[re.Pattern[str], set[str], BaseRoute]] | None = None

    def match(self, method: str, path: str) -> BaseRoute | None:
        if self._table is None:
            self._table = [
                (r.path_regex, set(r.methods or ()), r)
                for r in self._routes()
                if isinstance(r, Route) and getattr(r.endpoint, "__visionserve_admitted__", False)
            ]
        for regex, methods, route in self._table:
            if method in methods and regex.match(path):
                return route
        return None


class AdmissionGateMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        scheduler: Scheduler,
        routes: AdmittedRoutes,
        renderer_for: Callable[[str], ErrorRenderer],
    ) -> None:
        self.app = app
        self.scheduler = scheduler
        self.routes = routes
        self.renderer_for = renderer_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ticket: Ticket | None = scope.get("state", {}).pop(RESERVED, None)
        if ticket is None:
            path = scope["path"]
            route = self.routes.match(scope["method"], path)
            if route is not None:
                scope["route"] = route  # for the metrics' route label
                try:
                    ticket = self.scheduler.admit()  # refuses (and counts it) while full
                except Overloaded as e:
                    headers = e.headers
                    if any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope["headers"]):
                        # The client waits to be told to send its body, and is not: it may
                        # send it anyway or not at all, so this connection cannot go on.
                        headers = {**headers, "Connection": "close"}
                    response = self.renderer_for(path)(e.status, e.code, e.message, headers)
                    await response(scope, receive, send)
                    return
        if ticket is None:
            await self.app(scope, receive, send)
            return
        token = reserve(ticket)
        self.scheduler.receiving(ticket)
        try:
            await self.app(scope, self._body_receiver(ticket, receive), send)
        finally:
            unreserve(token)
            ticket.release()

    def _body_receiver(self, ticket: Ticket, receive: Receive) -> Receive:
        """``receive``, telling the scheduler how the body arrives: a slow upload may give its
        place up meanwhile, and needs one again when the body is complete (which may refuse
        it: the error goes to the handler reading the body, and becomes its 503)."""
        scheduler = self.scheduler

        async def receive_body() -> Message:
            message = await receive()
            if ticket.receiving_since is not None and message["type"] == "http.request":
                if message.get("more_body", False):
                    scheduler.receive_more(ticket, len(message.get("body", b"")))
                else:
                    await scheduler.received(ticket)
            return message

        return receive_body
