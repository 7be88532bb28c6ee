"""The server's listening socket, bound before anything slow happens.

``visionserve serve`` binds first: a port already in use, or an address this machine does
not have, fails in milliseconds with one clear line, before models are pulled, the
inference process is started or models are loaded. The socket is bound but not listening
until uvicorn starts serving on it, so until then connections are refused, not queued.
Only the standard library here: the CLI imports it ahead of the HTTP stack.
"""

from __future__ import annotations

import socket


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (an IPv6 address when it has a colon); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn and asyncio do: a restart may bind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
