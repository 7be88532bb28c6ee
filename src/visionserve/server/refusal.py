"""Refusing excess detection requests inside the HTTP parser, before any ASGI work.

Under overload, clients that re-send at once after each 503 make refusals most of what the
HTTP process does (thousands per second), and every CPU cycle they take is one the
inference workers lack on a small machine. The admission gate middleware already refuses
before routing and body parsing; this goes one step earlier: as soon as a request's
headers are parsed and the server is full, the HTTP protocol writes a ready-made 503 (the
protocol's own error body, Retry-After, X-Request-ID) and discards the body as it arrives,
with no ASGI scope, task or middleware. Counted in the same metrics as any refusal. The
discarded body is held to the same limits as one that is read (``limits.body_timeout_s``,
``limits.max_body_bytes``; past them the connection is closed), and a client that sends
request after request without reading the 503s is not read from until it does. After a
refusal, the connection is not read for ``queue.refusal_pause_ms``: a client that re-sends at
once, ignoring Retry-After, otherwise turns each round trip into another refusal, and on a
small machine a few such clients take the cores the workers need (docs/benchmarks.md).

A request that is let in takes its place here too (passed on in the scope's state), so
when a place frees up, the requests that arrived meanwhile do not all go on to be refused
later, after their bodies were read. Used by ``visionserve serve`` with uvicorn's httptools
parser; anything unusual (HTTP/1.0,
``Connection: close``, ``Expect: 100-continue``, pipelined requests, escaped paths) takes
the ordinary path, where the gate middleware refuses it.

The same protocol answers a request the parser cannot read with a JSON 400 in the error
shape of its path's protocol, not uvicorn's plain text (after the answers to requests
pipelined before it, which uvicorn's immediate close lost), bounds the time a request's headers
may take and their size, and serves requests with ``Upgrade`` as plain HTTP/1.1
(server/connection.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from starlette.routing import BaseRoute

from visionserve.errors import BadRequest, Overloaded, URITooLong, VisionServeError
from visionserve.metrics import Metrics
from visionserve.protocols import ErrorRenderer
from visionserve.runtime.scheduler import Scheduler, Ticket
from visionserve.server.admission import RESERVED, AdmittedRoutes
from visionserve.server.middleware import declared_over, safe_request_id

# httptools splits a URL with 16-bit offsets (http_parser's parse_url): a longer one, which
# only a raised limits.max_header_bytes lets through, cannot be routed.
MAX_URL_BYTES = 65535

log = logging.getLogger("visionserve")


class Refusals:
    """Builds (and caches) the raw 503 for a request to a detection route while full."""

    def __init__(
        self,
        scheduler: Scheduler,
        metrics: Metrics,
        routes: AdmittedRoutes,
        renderer_for: Callable[[str], ErrorRenderer],
        max_body_bytes: int = 20_000_000,
        body_timeout_s: float = 10.0,
        pause_s: float = 0.0,
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.routes = routes
        self.renderer_for = renderer_for
        # A refused request's body is read and thrown away (so the connection can serve the
        # next request) within the same limits as one that is let in; past them, the
        # connection is closed.
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        # After a refusal, the connection is not read for this long: a client that re-sends at
        # once (ignoring Retry-After) costs one refusal per pause, not one per round trip.
        self.pause_s = pause_s
        self._heads: dict[tuple[int, str], tuple[bytes, bytes]] = {}

    def admit(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], default_headers: list
    ) -> Ticket | bytes | BaseRoute | None:
        """For a detection route: its place (a Ticket) or, when full, the complete 503
        response, or the route alone for a body over the size limit (413 from the app, for
        which no place is taken); None for other routes."""
        route = self.routes.match(method, path)
        if route is None:
            return None
        if declared_over(headers, self.max_body_bytes):
            # Refused by its size (413, BodyLimitMiddleware) ahead of the admission gate,
            # which would have given the place back: it takes none.
            return route
        try:
            return self.scheduler.admit()
        except Overloaded as e:
            renderer = self.renderer_for(path)
            key = (id(renderer), e.message)
            cached = self._heads.get(key)
            if cached is None:
                cached = self._heads[key] = _render(renderer(e.status, e.code, e.message, e.headers))
            head, body = cached
            route_path = getattr(route, "path", "unmatched")
            self.metrics.observe_request(route_path, method, e.status, 0.0)
        return head + _header_lines(default_headers) + _request_id_line(headers) + b"\r\n" + body

    def closing_answer(self, url: bytes, error: VisionServeError, extra_headers: bytes) -> bytes:
        """The complete answer, with ``Connection: close``, to an error the HTTP protocol
        answers itself before closing the connection, in the error shape of the protocol its
        path (as far as it was read) belongs to."""
        path = url.split(b"?", 1)[0].decode("latin-1")
        head, body = _render(self.renderer_for(path)(error.status, error.code, error.message, error.headers))
        return head + extra_headers + b"connection: close\r\n\r\n" + body


def _render(response) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    from http import HTTPStatus

    status = response.status_code
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode() + _header_lines(response.raw_headers)
    return head, bytes(response.body)


def _header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(k + b": " + v + b"\r\n" for k, v in headers)


def _request_id_line(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The answer's X-Request-ID header line: the request's last one, as the request-id
    middleware takes it for every other answer, or a new one."""
    incoming = next((v for k, v in reversed(headers) if k == b"x-request-id"), b"").decode("latin-1")
    return b"x-request-id: " + safe_request_id(incoming).encode("latin-1") + b"\r\n"


class _Event:
    def set(self) -> None:
        pass


class _Refused:
    """Stands in for uvicorn's request cycle after a refusal: its body is discarded."""

    response_complete = True
    disconnected = False
    keep_alive = True
    message_event = _Event()

    def __init__(self) -> None:
        self.discarded = 0  # body bytes thrown away so far
        self.body_done = False


def refusing_protocol(
    refusals: Refusals, header_timeout_s: float = 10.0, max_header_bytes: int = 65536
) -> type | None:
    """uvicorn's httptools protocol with the early refusal and the connection guards of
    server/connection.py; None without httptools."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        from visionserve.server.connection import HeaderDeadline, HeaderLimit, LingeringClose, PlainUpgrade
    except ImportError:
        return None

    class EarlyRefusal(  # type: ignore[misc]
        LingeringClose, HeaderDeadline, PlainUpgrade, HttpToolsProtocol
    ):
        _body_timer: asyncio.TimerHandle | None = None
        _reading_held = False  # reads paused until the client takes its refusals
        _pause_timer: asyncio.TimerHandle | None = None  # reads paused for a while after a refusal

        def on_message_begin(self) -> None:
            # A request is starting: a keep-alive timer armed after a refusal earlier in
            # the same read must not close the connection under it.
            self._unset_keepalive_if_required()
            super().on_message_begin()

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if isinstance(cycle, _Refused):
                cycle.discarded += len(body)
                if cycle.discarded > refusals.max_body_bytes:
                    self.transport.close()  # no one reads it: not worth receiving more
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            if isinstance(self.cycle, _Refused):
                self.cycle.body_done = True
                # The refused body is done: the connection idles until the next request,
                # under uvicorn's keep-alive timeout and the header deadline like any other.
                self._cancel_body_timer()
                self._unset_keepalive_if_required()
                if not self.transport.is_closing():
                    self.timeout_keep_alive_task = self.loop.call_later(
                        self.timeout_keep_alive, self.timeout_keep_alive_handler
                    )
                    self._arm_header_deadline()
                return
            super().on_message_complete()

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._reading_held:
                self._reading_held = False
                self._resume_reading_unless_paused()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_body_timer()
            if self._pause_timer is not None:
                self._pause_timer.cancel()
                self._pause_timer = None
            super().connection_lost(exc)

        def _refuse(self, answer: bytes) -> None:
            self.cycle = _Refused()  # type: ignore[assignment]
            self.transport.write(answer)
            # uvicorn's own, without arming the header deadline: the connection waits for
            # this request's body, not for a request (a new cycle tells the deadline that
            # the last wait's request came).
            HttpToolsProtocol.on_response_complete(self)
            # The body may still be coming: it gets the body timeout, not the keep-alive one
            # (any data received cancels that, and nothing would arm it again).
            self._unset_keepalive_if_required()
            self._body_timer = self.loop.call_later(refusals.body_timeout_s, self._body_timed_out)
            if refusals.pause_s > 0:
                # The 503 is on its way; the next request is read after the pause. What was
                # already read is still parsed (the refused body's start, pipelined requests).
                self.flow.pause_reading()
                if self._pause_timer is not None:
                    self._pause_timer.cancel()
                self._pause_timer = self.loop.call_later(refusals.pause_s, self._pause_over)
            if self.flow.write_paused:
                # A client that sends requests without reading the answers: read no more
                # until it does, or the answers pile up in this process's memory.
                self.flow.pause_reading()
                self._reading_held = True

        def _pause_over(self) -> None:
            self._pause_timer = None
            self._resume_reading_unless_paused()

        def _resume_reading_unless_paused(self) -> None:
            """Reads again once neither pause holds: the one after a refusal, and the one
            while the client is not reading its answers."""
            if self._pause_timer is None and not self._reading_held:
                self.flow.resume_reading()

        def _body_timed_out(self) -> None:
            self._body_timer = None
            if isinstance(self.cycle, _Refused) and not self.transport.is_closing():
                self.transport.close()

        def _cancel_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def on_headers_complete(self) -> None:
            if (
                (self.cycle is None or self.cycle.response_complete)
                and not self.expect_100_continue
                and self.parser.should_keep_alive()
                and self.parser.get_http_version() == "1.1"
                and not self.parser.should_upgrade()
            ):
                raw_path = httptools.parse_url(self.url).path
                if b"%" not in raw_path:
                    method = self.parser.get_method().decode("ascii")
                    answer = refusals.admit(
                        method, self.root_path + raw_path.decode("ascii"), self.headers,
                        self.server_state.default_headers,
                    )
                    if isinstance(answer, bytes):
                        self._refuse(answer)
                        return
                    if isinstance(answer, BaseRoute):  # its 413 is counted under its route
                        self.scope["route"] = answer
                    elif answer is not None:  # admitted: the gate middleware hands it on
                        self.scope["state"][RESERVED] = answer
            super().on_headers_complete()

        def _unsupported_upgrade_warning(self) -> None:
            # WebSockets are off on purpose (lifecycle.serve): an upgrade request is answered
            # as plain HTTP, and uvicorn's advice to install a WebSocket library would mislead.
            log.debug("upgrade request answered as plain HTTP")

        def _closing_answer(self, error: VisionServeError) -> bytes:
            """The answer the connection guards give the request under way before closing."""
            # A request unreadable from its first line has no url or headers yet.
            headers, url = getattr(self, "headers", []), getattr(self, "url", b"")
            extra = _header_lines(self.server_state.default_headers) + _request_id_line(headers)
            return refusals.closing_answer(url, error, extra)

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers an unreadable request (bad request line, Content-Length or
            # chunking) in plain text; every error of this server is JSON.
            if len(getattr(self, "url", b"")) > MAX_URL_BYTES:  # readable, but too long to split
                error: VisionServeError = URITooLong(f"the request's URL exceeds {MAX_URL_BYTES} bytes")
            else:
                error = BadRequest("malformed HTTP request")
            cycle = self.cycle
            if isinstance(cycle, _Refused) and not cycle.body_done:
                self.transport.close()  # its body is unreadable, and its answer (503) is out already
                return
            self.close_after_answers(self._closing_answer(error))

        # The answer that closes the connection, once those before it are out, and whether to
        # read on (and drop) what the client still sends before closing (LingeringClose).
        _closing: tuple[bytes, bool] | None = None

        def close_after_answers(self, answer: bytes, lingering: bool = False) -> None:
            """Writes ``answer`` and closes the connection once the requests read in full before
            the one it answers have their answers. uvicorn closed at once, and those answers
            were lost."""
            if self._closing is not None:  # deferred already: the parser fails on what follows
                self.flow.pause_reading()
                return
            if self._unanswered_before_failure():
                self._closing = (answer, lingering)
                self.flow.pause_reading()  # the request cannot be read on: read nothing more
                return
            self._write_and_close(answer, lingering)

        def _write_and_close(self, answer: bytes, lingering: bool) -> None:
            self.transport.write(answer)
            self.close_lingering() if lingering else self.transport.close()

        def _unanswered_before_failure(self) -> bool:
            """Whether requests read before the one that failed still await their answers.

            The latest request (``self.cycle``) failed itself when it is still receiving its
            body: the one running, whose answer is then the error, or one pipelined behind
            others, which is dropped so that it never starts. Otherwise the failure is in a
            head read after it, and it is the latest of those awaiting answers."""
            cycle = self.cycle
            if cycle is None or isinstance(cycle, _Refused):
                return bool(self.pipeline)
            if cycle.more_body:
                for entry in self.pipeline:
                    if entry[0] is cycle:
                        self.pipeline.remove(entry)
                        return True  # behind a request still running
                return False
            return bool(self.pipeline) or not cycle.response_complete

        def on_response_complete(self) -> None:
            started_next = bool(self.pipeline)
            super().on_response_complete()  # starts the next pipelined request, if any
            if self._closing is None or self.transport.is_closing():
                return
            if started_next:  # its answer comes first
                self.flow.pause_reading()
                return
            self._unset_keepalive_if_required()
            self._write_and_close(*self._closing)

    class RefusingHttpToolsProtocol(HeaderLimit, EarlyRefusal):  # type: ignore[misc]
        """HeaderLimit comes first: it must see every request begin and end, and a refused
        request's body and end stop in EarlyRefusal."""

    RefusingHttpToolsProtocol.header_timeout_s = header_timeout_s
    RefusingHttpToolsProtocol.max_header_bytes = max_header_bytes
    return RefusingHttpToolsProtocol
