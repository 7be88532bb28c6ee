"""Connection guards for uvicorn's httptools protocol, mixed into the server's protocol class
(server/refusal.py builds it; they come before uvicorn's class in its bases).

``HeaderDeadline``: uvicorn bounds a connection only after an answer (its keep-alive timer),
and that timer is cancelled by the first byte that arrives. A connection that sends nothing,
or part of a request line or headers and then stalls or trickles (slowloris), stayed open for
good, each holding a socket and a file descriptor. Now a request's headers must be complete
``limits.header_timeout_s`` after the connection opened or after the previous answer; past
that the connection is closed. One timer per request, armed when the connection starts to
wait for a request and cancelled when the headers are in: nothing per read.
"""

from __future__ import annotations

import asyncio


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
