"""Open Inference Protocol (V2) REST adapter: ``codec`` is the wire format, ``routes`` the endpoints."""

from visionserve.protocols.v2.routes import PROTOCOL

__all__ = ["PROTOCOL"]
