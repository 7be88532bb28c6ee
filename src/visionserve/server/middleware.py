"""ASGI middleware: request ids, the access log, the body's size and time limits, and a
last-resort error boundary so that no exception ever reaches a client as a stack trace."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionserve.errors import PayloadTooLarge, RequestTimeout
from visionserve.metrics import Metrics
from visionserve.protocols import ErrorRenderer
from visionserve.server.logs import printable

access_log = logging.getLogger("visionserve.access")
error_log = logging.getLogger("visionserve.error")
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def safe_request_id(incoming: str) -> str:
    """The client's X-Request-ID when it is a safe token, else a fresh one."""
    return incoming if _VALID_ID.fullmatch(incoming) else uuid.uuid4().hex


def route_label(scope: Scope) -> str:
    """The template of the route that served the request (not the raw path, which would make
    the metrics' label set unbounded), or "unmatched". FastAPI's routes put themselves in the
    scope; Starlette's (``/metrics``, ``/openapi.json``) only their endpoint, looked up here."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", None) or "unmatched"
    endpoint = scope.get("endpoint")
    app = scope.get("app")
    if endpoint is None or app is None:
        return "unmatched"
    return next((r.path for r in app.routes if getattr(r, "endpoint", None) is endpoint), "unmatched")


class RequestContextMiddleware:
    """Outermost layer: assigns ``X-Request-ID``, logs one line per request, and turns any
    unhandled exception into the protocol's JSON 500."""

    def __init__(
        self,
        app: ASGIApp,
        renderer_for: Callable[[str], ErrorRenderer],
        access: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.renderer_for = renderer_for
        self.access = access
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = safe_request_id(incoming)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received"] = time.monotonic()  # deadlines count from here
        start = time.perf_counter()
        status = 0
        sent = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # Only a forced stop (a second SIGTERM while draining) cancels a request: it
            # still gets its protocol's JSON answer, not uvicorn's plain-text 500.
            if status == 0:
                response = self.renderer_for(scope["path"])(
                    503, "overloaded", "the server stopped before answering", {"Retry-After": "1", "Connection": "close"}
                )
                await response(scope, receive, send_wrapper)
            raise
        except Exception:
            error_log.exception(
                "unhandled error in %s %s (request %s)", scope["method"], printable(scope["path"]), request_id
            )
            if status == 0:  # nothing sent yet: answer with the protocol's 500
                response = self.renderer_for(scope["path"])(500, "internal_error", "internal server error", {})
                await response(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.observe_request(route_label(scope), scope["method"], status, seconds)
            if self.access:
                ms = seconds * 1e3
                client = scope.get("client")
                access_log.info(
                    '%s %s %s %d %.1fms %s',
                    client[0] if client else "-", scope["method"], printable(scope["path"]), status, ms, request_id,
                    extra={"fields": {
                        "request_id": request_id, "method": scope["method"], "path": scope["path"],
                        "status": status, "duration_ms": round(ms, 2), "bytes": sent,
                        "client": client[0] if client else None,
                    }},
                )


def declared_over(headers: list[tuple[bytes, bytes]], max_bytes: int) -> bool:
    """Whether the request's Content-Length says its body is over ``max_bytes`` (413 at once)."""
    declared = next((v for k, v in headers if k == b"content-length"), b"")
    return declared.isdigit() and int(declared) > max_bytes


class BodyLimitMiddleware:
    """Rejects bodies over ``max_bytes`` (at once from Content-Length, or while streaming) and
    bodies not in ``timeout_s`` after the request began to read them (408).

    The time limit bounds what a stalled upload holds: its connection and memory, and a
    detection request's place for up to ``queue.upload_hold_ms`` (runtime/scheduler.py).
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, renderer_for: Callable[[str], ErrorRenderer], timeout_s: float = 10.0
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.renderer_for = renderer_for
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if declared_over(scope["headers"], self.max_bytes):
            response = self.renderer_for(scope["path"])(
                413, PayloadTooLarge.code, self._message(), {"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        received = 0
        deadline: float | None = None  # set by the first read of the body
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, complete
            if complete:  # later reads wait for the client to go away (disconnect watcher)
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                # One timer per read, no task: cheap enough for every request.
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s", headers={"Connection": "close"}
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._message(), headers={"Connection": "close"})
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body exceeds the limit of {self.max_bytes} bytes"
