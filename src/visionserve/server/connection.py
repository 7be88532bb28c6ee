"""Connection guards for uvicorn's httptools protocol, mixed into the server's protocol class
(server/refusal.py builds it; they come before uvicorn's class in its bases).

``HeaderDeadline``: uvicorn bounds a connection only after an answer (its keep-alive timer),
and that timer is cancelled by the first byte that arrives. A connection that sends nothing,
or part of a request line or headers and then stalls or trickles (slowloris), stayed open for
good, each holding a socket and a file descriptor. Now a request's headers must be complete
``limits.header_timeout_s`` after the connection opened, or on a kept-alive connection after
the request's first byte; past that the connection is closed. Between requests a connection
idles up to ``limits.keep_alive_s`` (uvicorn's keep-alive timer), which may be longer: behind
a load balancer it must outlast the balancer's own idle timeout, or the balancer sends
requests down connections the server is closing (502s). Cheap per request: an answer or a
request's first byte moves the deadline (a clock read), and one timer per connection, set no
later than the deadline and re-armed when it fires early, checks it.

``PlainUpgrade``: a request with ``Upgrade`` (``curl --http2`` on plain HTTP sends
``Connection: Upgrade, HTTP2-Settings`` and ``Upgrade: h2c``) lost its body. httptools tells
llhttp that an upgrade request has no body, so the message ends with its headers (the app reads
an empty body), and uvicorn, which upgrades to nothing but WebSockets, then drops the rest of
that read; the body's next reads were parsed as a new request (400, connection closed). RFC
9110 §7.8 lets a server ignore Upgrade and answer over HTTP/1.1, so this protocol does: the
request's end is taken back, and a new parser reads its body after a stand-in head (the
request's own Content-Length or Transfer-Encoding) that reaches no one, then reads the
connection on as HTTP/1.1. Nothing changes for other requests.

``LingeringClose``: an answer given before the request's body has arrived (413 for a body
over the limit, a 503 to an HTTP/1.0 or ``Connection: close`` upload while the server is
full) closes the connection. Closed with that body still arriving, the socket answers it
with a reset, and a client still sending its body gets a broken pipe or a reset instead of
the answer (Python's urllib, for one, every time, for a 30 MB upload). Now the connection
is half-closed (the answer, then end-of-file) and what the client still sends is read and
thrown away until it closes its side, or ``LINGER_S`` at most, as nginx's lingering close
does.

``HeaderLimit``: httptools sets no limit on a request's head. It gathers a header's value
until its line ends, so one header sent without end grew the process by all that arrived
(30 MB in a few seconds over loopback, per connection); the header deadline bounds the time
a head may take, not its size. Now a head (request line and headers) over
``limits.max_header_bytes`` is answered 431 and the connection closed, as nginx, Node.js and
h11 (uvicorn's other parser) refuse oversized heads.

The protocol that mixes in ``HeaderDeadline`` or ``HeaderLimit`` provides
``_closing_answer(error) -> bytes``: the complete answer to the request under way, in its
path's error shape, with ``Connection: close``; and for ``HeaderLimit``,
``close_after_answers(answer, lingering)``, which writes it once the requests before it are
answered and then closes (server/refusal.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools

from visionserve.errors import HeaderTooLarge, RequestTimeout

LINGER_S = 5.0  # the longest a closing connection reads what its client still sends

log = logging.getLogger("visionserve")


class HeaderDeadline:
    """Closes a connection whose next request's headers are not complete in time. When part
    of a request had arrived, the client first gets a 408 with
    ``Connection: close``, as Apache, HAProxy and Node.js answer a partial request: a slow
    client, or whoever debugs one, learns why. A connection on which nothing of a request
    arrived is closed silently, as those servers do (and nginx and Go in both cases): a 408
    there could be taken as the answer to a request the client is only now sending (RFC 9112
    §9.5), and browsers open spare connections that they may leave unused a while.

    The deadline holds while the connection waits for a request: from ``connection_made``,
    and from each answer after which uvicorn waits for the next request (it arms its
    keep-alive timer then). After an answer it first allows for the keep-alive wait (uvicorn
    closes a connection idle that long), and moves to ``header_timeout_s`` after the next
    request's first byte. It is met once a request's headers are complete: uvicorn then
    makes a new request cycle."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _timer_at = 0.0  # loop time the timer fires at
    _header_deadline = 0.0  # loop time
    _awaited_after: object = None  # the request cycle when the wait began
    _scope_then: object = None  # the answered request's scope; a new one means a request began
    _idle_wait = False  # the deadline allows for the keep-alive wait: no request has begun

    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        if self._idle_wait:
            # The request waited for has begun: its headers are due header_timeout_s from now.
            self._idle_wait = False
            loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
            self._header_deadline = loop.time() + self.header_timeout_s
            if self._header_timer is None or self._timer_at > self._header_deadline:
                # Only after an idle wait longer than header_timeout_s (a keep-alive above it).
                self._set_timer(self._header_deadline)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # Not when a pipelined request is already in, nor when the connection is closing.
        if self.timeout_keep_alive_task is not None:  # type: ignore[attr-defined]
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        """The connection now waits for a request: its headers are due in header_timeout_s,
        after the keep-alive wait when an answer came before and nothing of the next request
        has yet."""
        loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
        cycle = self.cycle  # type: ignore[attr-defined]
        self._awaited_after = cycle
        # The answered request's scope: the next request may have begun already (sent with
        # it, or while it ran), and its partial headers must still count as a request.
        # A refused request has no cycle of its own; nothing of the next has come after it yet.
        self._scope_then = getattr(cycle, "scope", None) or self.scope  # type: ignore[attr-defined]
        now = loop.time()
        self._idle_wait = cycle is not None and self.scope is self._scope_then  # type: ignore[attr-defined]
        idle = self.timeout_keep_alive if self._idle_wait else 0.0  # type: ignore[attr-defined]
        self._header_deadline = now + idle + self.header_timeout_s
        # Set header_timeout_s ahead, not at the deadline: a request that begins during the
        # idle wait has its deadline no earlier, so moving it needs no new timer.
        first_check = now + self.header_timeout_s
        if self._header_timer is None or self._timer_at > first_check:
            self._set_timer(first_check)

    def _set_timer(self, at: float) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
        self._timer_at = at
        self._header_timer = loop.call_at(at, self._check_header_deadline)

    def _check_header_deadline(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if self.cycle is not self._awaited_after or transport.is_closing():  # type: ignore[attr-defined]
            return  # met (a request came): armed again when the next wait begins
        loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
        if loop.time() < deadline:  # the wait began again, or was longer, since this timer was set
            self._set_timer(deadline)
            return
        if self.scope is not self._scope_then:  # type: ignore[attr-defined]
            # on_message_begin has run for this request: its url and headers, as far as they
            # arrived, name its path and request id.
            log.debug("request headers not complete in %gs: connection closed with 408", self.header_timeout_s)
            error = RequestTimeout(f"the request headers did not arrive within {self.header_timeout_s:g} s")
            transport.write(self._closing_answer(error))  # type: ignore[attr-defined]
        transport.close()


class HeaderLimit:
    """Answers a request whose head grows past ``max_header_bytes`` with 431 and closes the
    connection.

    The parser tells when a head begins and ends, not where in a read, so a read that would
    take a head past the limit is fed in two: up to the limit, then (if the head ended
    within it) the rest. A read begins a head at its first byte when no request was under
    way; one that begins in a body (pipelining) and starts a head after it is not counted,
    which never takes a body's bytes for a head. Mixed in ahead of the protocol's other
    classes, so that it sees every request begin and end, refused ones included."""

    max_header_bytes: int = 65536
    _in_message = False  # from a request's first byte to the end of its body
    _in_head = False  # from a request's first byte to the end of its headers
    _head_bytes = 0  # of the head under way, counted read by read
    _heads_begun = 0

    def on_message_begin(self) -> None:
        self._in_message = self._in_head = True
        self._head_bytes = 0
        self._heads_begun += 1
        super().on_message_begin()  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        # Also ends the head of PlainUpgrade's stand-in, whose completion reaches no one.
        self._in_head = False
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._in_message = self._in_head = False
        super().on_message_complete()  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._in_message and not self._in_head:
            super().data_received(data)  # type: ignore[misc]  # a body, perhaps a head after it
            return
        begun, in_head = self._heads_begun, self._in_head
        room = self.max_header_bytes - (self._head_bytes if in_head else 0)
        fed = data if len(data) <= room else data[:room]
        if fed:
            super().data_received(fed)  # type: ignore[misc]
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing():
            return
        # Still in the head that was under way, or that began at this read's first byte.
        if self._in_head and self._heads_begun == begun + (0 if in_head else 1):
            self._head_bytes = (self._head_bytes if in_head else 0) + len(fed)
            if len(fed) < len(data):
                self._in_head = False
                log.debug("request headers over %d bytes: connection closed with 431", self.max_header_bytes)
                error = HeaderTooLarge(f"the request's headers exceed the limit of {self.max_header_bytes} bytes")
                # After the answers to requests pipelined before it; the client is likely
                # still sending its head: read on and drop it, so that the answer is not lost
                # to a reset (LingeringClose).
                self.close_after_answers(self._closing_answer(error), lingering=True)  # type: ignore[attr-defined]
                return
        if len(fed) < len(data):
            self.data_received(data[len(fed):])


class PlainUpgrade:
    """Serves a request that asks for an upgrade as plain HTTP/1.1, with its body. For a server
    with no WebSockets (``ws="none"``); a WebSocket upgrade, were they on, is handed to
    uvicorn as before. It replaces uvicorn's ``data_received``, at the same cost."""

    def data_received(self, data: bytes) -> None:
        # uvicorn's, but the read goes on past an upgrade request instead of being dropped.
        self._unset_keepalive_if_required()  # type: ignore[attr-defined]
        while True:
            try:
                self.parser.feed_data(data)  # type: ignore[attr-defined]
                return
            except httptools.HttpParserError:
                self.logger.warning("Invalid HTTP request received.")  # type: ignore[attr-defined]
                self.send_400_response("Invalid HTTP request received.")  # type: ignore[attr-defined]
                return
            except httptools.HttpParserUpgrade as upgrade:
                if self._should_upgrade():  # type: ignore[attr-defined]
                    self.handle_websocket_upgrade()  # type: ignore[attr-defined]
                    return
                self._unsupported_upgrade_warning()  # type: ignore[attr-defined]
                # The parser stopped right after the request's headers: what follows in this
                # read is its body, then any pipelined requests.
                data = self._read_on_as_http(data[upgrade.args[0]:])
                if not data:
                    return

    def _read_on_as_http(self, rest: bytes) -> bytes:
        """What to feed the parser next, after an upgrade request's headers."""
        head = self._stand_in_head()
        cycle = self.cycle  # type: ignore[attr-defined]
        if head is None or cycle is None or cycle.response_complete:
            return rest  # no body: httptools has already set the parser to read a new request
        # The parser ended the message with its headers, and uvicorn told the request so; its
        # task has not run yet (still in this read), so taking that back is safe.
        cycle.more_body = True
        parser = httptools.HttpRequestParser(_AfterStandInHead(self))
        try:
            parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        except AttributeError:  # httptools < 0.6.3
            pass
        self.parser = parser
        return head + rest

    def _stand_in_head(self) -> bytes | None:
        """A request head with only this request's body framing (None when it has no body),
        for a parser to read the body by. Its target is the request's own (a malformed body
        is answered in its path's error shape); its method is never CONNECT, which llhttp
        would take for an upgrade again."""
        framing = [k + b": " + v + b"\r\n" for k, v in self.headers if k in _FRAMING]  # type: ignore[attr-defined]
        if not framing:
            return None
        url: bytes = self.url  # type: ignore[attr-defined]
        target = url if url.startswith(b"/") else b"/"
        return b"POST " + target + b" HTTP/1.1\r\n" + b"".join(framing) + b"\r\n"


class _AfterStandInHead:
    """The callbacks of the parser that reads on after an upgrade request: the protocol's,
    except that the stand-in head's completion reaches no one (its request is under way),
    and what its beginning set (the request's URL, headers and scope) is put back then."""

    def __init__(self, protocol: object) -> None:
        self._protocol = protocol
        self._stand_in = True
        self._request = (protocol.url, protocol.headers, protocol.scope, protocol.expect_100_continue)  # type: ignore[attr-defined]
        for name in ("on_message_begin", "on_url", "on_header", "on_body", "on_message_complete"):
            setattr(self, name, getattr(protocol, name))

    def on_headers_complete(self) -> None:
        if self._stand_in:
            self._stand_in = False
            # The header deadline tells a request that has begun by a new scope.
            p = self._protocol
            p.url, p.headers, p.scope, p.expect_100_continue = self._request  # type: ignore[attr-defined]
            return
        self._protocol.on_headers_complete()  # type: ignore[attr-defined]


_FRAMING = (b"content-length", b"transfer-encoding")


class LingeringClose:
    """Closes a connection whose request's body is still arriving by half-closing it and
    throwing away what comes, rather than at once (see the module's docstring). It wraps
    the transport that uvicorn's protocol and request cycles close."""

    _lingering = False
    _close_at_once = False  # the connection is gone, or the server is shutting down
    _linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the answer is out: what the client still sends goes nowhere
        super().data_received(data)  # type: ignore[misc]

    def close_lingering(self) -> None:
        """Closes after the answer written, reading on and dropping what the client still
        sends, whatever the request's state: for an answer given while its head arrives."""
        self.transport.close(linger=True)  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        self._close_at_once = True  # the server is stopping: no one waits for lingerers
        if self._lingering:
            self.transport.close()  # type: ignore[attr-defined]
            return
        super().shutdown()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_at_once = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _should_linger(self) -> bool:
        """Whether the request being answered may still be sending its body."""
        cycle = self.cycle  # type: ignore[attr-defined]
        return not self._close_at_once and cycle is not None and bool(getattr(cycle, "more_body", False))

    def _linger(self, transport: asyncio.Transport) -> None:
        """Half-closes ``transport`` (after what was written) and reads on until the client
        closes its side (uvicorn's eof_received returns None, so the transport then closes)
        or LINGER_S have passed."""
        self._lingering = True
        loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
        self._linger_timer = loop.call_later(LINGER_S, transport.close)
        transport.write_eof()
        transport.resume_reading()  # it may have been paused for back-pressure


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close`` lingers when the request's
    body may still be arriving; once closing, it says so and writes nothing more."""

    def __init__(self, transport: asyncio.Transport, protocol: LingeringClose) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    def close(self, linger: bool | None = None) -> None:
        """``linger``: read on after the answer whatever the request's state; None (uvicorn's
        calls): when its body may still be arriving."""
        real, protocol = self._transport, self._protocol
        if self._closing and not protocol._close_at_once:
            return  # lingering already, or closed
        self._closing = True
        if linger is None:
            linger = protocol._should_linger()
        if not linger or protocol._close_at_once or protocol._lingering or real.is_closing() or not real.can_write_eof():
            real.close()
        else:
            protocol._linger(real)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._transport.write(data)

    def pause_reading(self) -> None:
        if not self._protocol._lingering:
            self._transport.pause_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
