"""HEAD wherever GET is allowed, as HTTP requires (RFC 9110, 9.3.2): load balancers and
monitors probe with it.

FastAPI's routes answer only the methods they name (Starlette's own add HEAD to GET), and
adding HEAD to theirs would list every GET twice in the OpenAPI schema. So a HEAD request
that a GET route matches runs as that GET here, and only its status and headers (the GET's
Content-Length included) go out.
"""

from __future__ import annotations

from typing import Callable, Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGetMiddleware:
    def __init__(self, app: ASGIApp, routes: Callable[[], Iterable[BaseRoute]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}  # a copy: the server and the access log still see HEAD
        if not any(route.matches(as_get)[0] is Match.FULL for route in self.routes()):
            await self.app(scope, receive, send)  # no GET here either: the usual 404 or 405
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(as_get, receive, send_without_body)
        finally:
            # The router notes the matched route in its scope; the request metrics read it.
            if "route" in as_get:
                scope["route"] = as_get["route"]
