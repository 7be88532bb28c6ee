"""Connection guards for uvicorn's httptools protocol, mixed into the server's protocol class
(server/refusal.py builds it; they come before uvicorn's class in its bases).

``HeaderDeadline``: uvicorn bounds a connection only after an answer (its keep-alive timer),
and that timer is cancelled by the first byte that arrives. A connection that sends nothing,
or part of a request line or headers and then stalls or trickles (slowloris), stayed open for
good, each holding a socket and a file descriptor. Now a request's headers must be complete
``limits.header_timeout_s`` after the connection opened or after the previous answer; past
that the connection is closed. One timer per request, armed when the connection starts to
wait for a request and cancelled when the headers are in: nothing per read.

``PlainUpgrade``: a request with ``Upgrade`` (``curl --http2`` on plain HTTP sends
``Connection: Upgrade, HTTP2-Settings`` and ``Upgrade: h2c``) lost its body. httptools tells
llhttp that an upgrade request has no body, so the message ends with its headers (the app reads
an empty body), and uvicorn, which upgrades to nothing but WebSockets, then drops the rest of
that read; the body's next reads were parsed as a new request (400, connection closed). RFC
9110 §7.8 lets a server ignore Upgrade and answer over HTTP/1.1, so this protocol does: the
skipped body is re-framed for the parser by a stand-in head (the request's own Content-Length
or Transfer-Encoding) that reaches no one, and the connection goes on as HTTP/1.1.
"""

from __future__ import annotations

import asyncio

import httptools


class HeaderDeadline:
    """Closes a connection whose next request's headers are not complete in time. When part
    of a request had arrived, the client first gets a 408 (``_header_timeout_response``) with
    ``Connection: close``, as Apache, HAProxy and Node.js answer a partial request: a slow
    client, or whoever debugs one, learns why. A connection on which nothing of a request
    arrived is closed silently, as those servers do (and nginx and Go in both cases): a 408
    there could be taken as the answer to a request the client is only now sending (RFC 9112
    §9.5), and browsers open spare connections that they may leave unused a while."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _request_begun = False  # part of a request is in, its headers are not complete yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_message_begin(self) -> None:
        self._request_begun = True
        super().on_message_begin()  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        super().on_headers_complete()  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # uvicorn arms its keep-alive timer when the connection waits for a next request
        # (not when a pipelined one is already in, nor when it is closing). That timer still
        # closes an idle connection; this one bounds a request that has begun to arrive.
        if self.timeout_keep_alive_task is not None:  # type: ignore[attr-defined]
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(  # type: ignore[attr-defined]
            self.header_timeout_s, self._header_deadline_passed
        )

    def _cancel_header_deadline(self) -> None:
        self._request_begun = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing():
            return
        if self._request_begun:
            transport.write(self._header_timeout_response())
        transport.close()

    def _header_timeout_response(self) -> bytes:
        """The complete 408 response (with ``Connection: close``) for a partial request."""
        raise NotImplementedError


class PlainUpgrade:
    """Serves a request that asks for an upgrade as plain HTTP/1.1, with its body. For a server
    with no WebSockets (``ws="none"``); a WebSocket upgrade, were they on, is handed to
    uvicorn as before."""

    _skipped_body: bytes | None = None  # the stand-in head for the body the parser skipped
    _replaying = False  # the parser is reading that stand-in head

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
                # The parser stopped after the headers (httptools resumes it at once); what
                # follows in this read is the body, then any pipelined requests.
                data = data[upgrade.args[0]:]
                head, self._skipped_body = self._skipped_body, None
                if head is not None:
                    self._replaying = True
                    data = head + data
                if not data:
                    return

    def on_headers_complete(self) -> None:
        if self._replaying:  # the stand-in head: its request is already under way
            self._replaying = False
            return
        if self.parser.should_upgrade() and not self._should_upgrade():  # type: ignore[attr-defined]
            self._skipped_body = self._stand_in_head()
        super().on_headers_complete()  # type: ignore[misc]

    def on_message_complete(self) -> None:
        if self._skipped_body is not None:
            return  # not the end: the parser skipped the body, which is read after the stand-in head
        super().on_message_complete()  # type: ignore[misc]

    def _stand_in_head(self) -> bytes | None:
        """A request head with only this request's body framing (None when it has no body),
        for the parser to read the body by. Its target is the request's own (a malformed body
        is answered in its path's error shape); its method is never CONNECT, which llhttp
        would take for an upgrade again."""
        framing = [k + b": " + v + b"\r\n" for k, v in self.headers if k in _FRAMING]  # type: ignore[attr-defined]
        if not framing:
            return None
        url: bytes = self.url  # type: ignore[attr-defined]
        target = url if url.startswith(b"/") else b"/"
        return b"POST " + target + b" HTTP/1.1\r\n" + b"".join(framing) + b"\r\n"


_FRAMING = (b"content-length", b"transfer-encoding")
