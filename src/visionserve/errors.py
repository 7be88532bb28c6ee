"""Errors the service raises, independent of any protocol.

Each carries a stable machine-readable ``code`` and the HTTP status it maps to. Protocol
adapters decide the body shape; the code and status stay the same everywhere.
"""

from __future__ import annotations


class VisionServeError(Exception):
    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, detail: str | None = None) -> None:
        """``message`` may reach clients: it names no server file and quotes no library's
        internals. ``detail`` is for the server's log and the CLI only (paths, a library's words)."""
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.detail = detail


class MissingImage(VisionServeError):
    code, status = "missing_image", 400


class InvalidImage(VisionServeError):
    code, status = "invalid_image", 400


class BadRequest(VisionServeError):
    code, status = "bad_request", 400


class PayloadTooLarge(VisionServeError):
    code, status = "payload_too_large", 413


class RequestTimeout(VisionServeError):
    code, status = "request_timeout", 408


class HeaderTooLarge(VisionServeError):
    code, status = "header_too_large", 431


class URITooLong(VisionServeError):
    code, status = "uri_too_long", 414


class ImageTooLarge(VisionServeError):
    code, status = "image_too_large", 413


class UnsupportedMediaType(VisionServeError):
    code, status = "unsupported_media_type", 415


class InvalidParameter(VisionServeError):
    code, status = "invalid_parameter", 422


class ModelNotFound(VisionServeError):
    code, status = "model_not_found", 404


class ModelNotReady(VisionServeError):
    code, status = "model_not_ready", 503


RETRY_AFTER_S = "1"


class Overloaded(VisionServeError):
    """No place for the request now; it always says when to try again (Retry-After)."""

    code, status = "overloaded", 503

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, detail: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": RETRY_AFTER_S, **(headers or {})}, detail=detail)


class Unhealthy(VisionServeError):
    """The server cannot heal itself (a worker thread stuck on one job): liveness fails."""

    code, status = "unhealthy", 503


class DeadlineExceeded(VisionServeError):
    code, status = "deadline_exceeded", 504

    def __init__(
        self, message: str, *, stage: str = "worker", headers: dict[str, str] | None = None, detail: str | None = None
    ) -> None:
        """``stage``: where the request was when its deadline passed (the metrics' label);
        the worker's by default, as an error made in an inference process comes back with it."""
        super().__init__(message, headers=headers, detail=detail)
        self.stage = stage


class ModelError(VisionServeError):
    """A model file, manifest or catalog entry is unusable."""

    code, status = "model_error", 500


class InputError(VisionServeError):
    """``visionserve detect`` could not read an image file (missing, a folder, no permission):
    not the image's fault, so not ``invalid_image``."""

    code, status = "input_error", 400


class OutputError(VisionServeError):
    """``visionserve detect`` could not write an output file (an annotated image)."""

    code, status = "output_error", 500


class ModelLoadFailed(VisionServeError):
    """A model could not be loaded (broken files, a graph that does not fit its family).
    400, as Triton answers a load request whose model fails to load (INVALID_ARG)."""

    code, status = "model_load_failed", 400


def unexpected_error(e: BaseException, doing: str, details_in: str | None = "the server log") -> ModelError:
    """A ModelError for an exception nobody anticipated: its type for clients, its text
    (which may hold file paths) for the log, or, from a command, for the terminal
    (``details_in`` None: the CLI prints the detail below the message)."""
    where = f" ({details_in} has the details)" if details_in else ""
    return ModelError(f"unexpected {type(e).__name__} while {doing}{where}", detail=f"{type(e).__name__}: {e}")


class ConfigError(Exception):
    """A configuration is invalid; the message names the bad key."""


class ClientDisconnected(VisionServeError):
    """The client went away before the answer (nginx's 499); nothing reaches it."""

    code, status = "client_closed_request", 499
