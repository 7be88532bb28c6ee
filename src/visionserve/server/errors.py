"""Maps every error to its protocol's JSON body and the right status code."""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match

from visionserve.errors import ClientDisconnected, DeadlineExceeded, VisionServeError
from visionserve.protocols import ErrorRenderer

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    503: "unavailable",
}


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body", "header")]
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: FastAPI, request: Request) -> str:
    """The Allow header of a 405: every method some route takes at this path (Starlette's
    names only the first route's, and a path may have a route per method), HEAD with GET."""
    allowed = {
        method for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in app.routes)
    }
    if "GET" in allowed:
        allowed.add("HEAD")  # server/head.py
    return ", ".join(sorted(allowed))


def install_error_handlers(app: FastAPI, renderer_for: Callable[[str], ErrorRenderer]) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, VisionServeError)
        if isinstance(exc, DeadlineExceeded):
            # Counted here, once per answer: a request of several images is several jobs.
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None:
                metrics.child(metrics.deadline_exceeded, exc.stage).inc()
        return renderer_for(request.url.path)(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        headers = dict(exc.headers or {})
        if status == 405:
            headers["Allow"] = allowed_methods(app, request)
        code = _HTTP_CODES.get(status, "error")
        return renderer_for(request.url.path)(status, code, message, headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return renderer_for(request.url.path)(422, "invalid_parameter", validation_message(exc), {})

    async def client_disconnect(request: Request, exc: Exception) -> Response:
        # The client hung up while sending its body: its 499, not an unhandled error (500).
        return await service_error(request, ClientDisconnected("the client disconnected while sending the request"))

    app.add_exception_handler(VisionServeError, service_error)
    app.add_exception_handler(ClientDisconnect, client_disconnect)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
