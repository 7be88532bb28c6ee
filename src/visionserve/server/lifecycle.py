"""Running the server: graceful drain on SIGTERM/SIGINT, exit status 0 after a clean drain.

On the first signal the server keeps listening but refuses new detection requests with
503 (and /readyz turns 503, so a load balancer stops sending), waits until the requests
in progress are answered (at most ``drain_timeout_s``), then stops. A second signal stops
at once.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import time
from types import FrameType

import uvicorn

from visionserve.runtime.cpus import use_thread_settings
from visionserve.runtime.scheduler import Scheduler
from visionserve.server.refusal import refusing_protocol

log = logging.getLogger("visionserve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_timeout_s = drain_timeout_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: it would re-raise them at exit, and a
        # process killed by its own SIGTERM does not exit 0.
        if self._drain_started is not None:
            log.warning("second %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        self._drain_started = time.monotonic()
        self.scheduler.draining = True
        log.info(
            "%s: draining (%d requests in progress, up to %.0fs)",
            signal.Signals(sig).name, self.scheduler.in_progress, self.drain_timeout_s,
        )

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:  # uvicorn says where it listens only on sockets it bound
            host, port = sockets[0].getsockname()[:2]
            log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            if self.scheduler.idle or waited >= self.drain_timeout_s:
                if not self.scheduler.idle:
                    log.warning("drain timeout: %d requests still in progress", self.scheduler.in_progress)
                # The detection requests are done (or out of time): the others (repository
                # calls, say) get what is left of the drain, at least 1 s, then their 503.
                self.config.timeout_graceful_shutdown = max(1, math.ceil(self.drain_timeout_s - waited))
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app, sock: socket.socket, drain_timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    """Serves on ``sock`` (from ``listener.bind``) until drained; returns False when the
    server could not start."""
    settings = app.state.settings
    use_thread_settings(settings.runtime)
    refusing = (
        refusing_protocol(app.state.refusals, settings.limits.header_timeout_s, settings.limits.max_header_bytes)
        if hasattr(app.state, "refusals") else None
    )
    config = uvicorn.Config(
        app,
        http=refusing or "auto",
        # No route takes a WebSocket: an upgrade request is an ordinary HTTP request here and
        # gets the usual JSON answer, not the WebSocket handshake's bare 403.
        ws="none",
        # Only for uvicorn's own messages: it serves on the socket given to run().
        host=sock.getsockname()[0],
        port=sock.getsockname()[1],
        log_config=None,
        access_log=False,
        timeout_keep_alive=settings.limits.keep_alive_s,  # type: ignore[arg-type]  # a float works
        # Set again when the drain ends (on_tick): what is left of drain_timeout_s.
        timeout_graceful_shutdown=max(1, int(drain_timeout_s)),
        server_header=False,
    )
    server = DrainingServer(config, app.state.scheduler, drain_timeout_s)
    server.run(sockets=[sock])
    return server.started
