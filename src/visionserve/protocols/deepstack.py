"""The DeepStack / CodeProject.AI object detection API, as Home Assistant, Frigate and Blue
Iris call it: a multipart upload in field ``image``, optional ``min_confidence`` (default
0.4) and ``api_key``.

Answers ``{"success": true, "predictions": [{label, confidence, x_min, y_min, x_max, y_max}]}``
with integer pixel coordinates, highest confidence first and at most
``deepstack.max_detections`` of them (Frigate reads 20), plus CodeProject.AI's extra fields.
Failures are ``{"success": false, "error": ..., "code": ...}`` with DeepStack's status codes.
"""

from __future__ import annotations

import hmac
import math
import time
from email.utils import formatdate
from typing import Any, Mapping

import numpy as np
from fastapi import APIRouter, Request
from starlette.datastructures import FormData, UploadFile
from starlette.responses import JSONResponse, Response

from visionserve.config import DeepStackSettings
from visionserve.errors import InvalidParameter, MissingImage, VisionServeError
from visionserve.protocols import Protocol, header_timeout_ms, received_at, refuse_content_encoding, server_timing
from visionserve.server.admission import admitted
from visionserve.server.disconnect import unless_disconnected
from visionserve.types import PredictParams, Prediction

router = APIRouter(prefix="/v1/vision", tags=["DeepStack / CodeProject.AI"])

MODULE_ID = "visionserve"
# DeepStack answers 400 where visionserve would say 415 or 422.
_STATUS = {415: 400, 422: 400}


class IncorrectApiKey(VisionServeError):
    code, status = "incorrect_api_key", 401


def render_error(status: int, code: str, message: str, headers: Mapping[str, str]) -> Response:
    status = _STATUS.get(status, status)
    return JSONResponse({"success": False, "error": message, "code": status}, status_code=status, headers=dict(headers))


# -- the response body ---------------------------------------------------------------------


def detection_response(
    prediction: Prediction, *, command: str, max_detections: int, round_trip_ms: float, provider: str = "CPU"
) -> dict[str, Any]:
    """DeepStack's detection answer with CodeProject.AI's fields, from a protocol-neutral prediction."""
    d = prediction.detections
    order = np.argsort(-d.scores, kind="stable")[:max_detections]
    # DeepStack truncates box corners to whole pixels.
    boxes = np.floor(d.boxes[order]).astype(np.int64).tolist()
    scores = d.scores[order].astype(np.float64).round(5).tolist()
    labels = [d.labels[i] for i in d.class_ids[order].tolist()]
    predictions = [
        {"label": label, "confidence": score, "x_min": b[0], "y_min": b[1], "x_max": b[2], "y_max": b[3]}
        for label, score, b in zip(labels, scores, boxes)
    ]
    timings = prediction.timings_ms
    process_ms = sum(timings.get(k, 0.0) for k in ("decode", "preprocess", "inference", "postprocess"))
    found = list(dict.fromkeys(labels))
    return {
        "success": True,
        "predictions": predictions,
        "count": len(predictions),
        "message": f"Found {', '.join(found)}" if found else "No objects found",
        "duration": int(round(round_trip_ms)),
        "inferenceMs": int(round(timings.get("inference", 0.0))),
        "processMs": int(round(process_ms)),
        "analysisRoundTripMs": int(round(round_trip_ms)),
        "moduleId": MODULE_ID,
        "moduleName": f"visionserve ({prediction.model})",
        "command": command,
        "executionProvider": provider,
        "canUseGPU": provider != "CPU",
        "code": 200,
        "processedBy": "localhost",
        "timestampUTC": formatdate(usegmt=True),
    }


def parse_min_confidence(value: Any, default: float) -> float:
    """The ``min_confidence`` form field as DeepStack reads it: blank means the default."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter("Invalid value for min_confidence") from None
    if not math.isfinite(number):
        raise InvalidParameter("Invalid value for min_confidence")
    if number > 1.0:
        raise InvalidParameter("min_confidence cannot be greater than 1")
    return max(number, 0.0)


def check_api_key(sent: Any, settings: DeepStackSettings) -> None:
    """When an api_key is configured, the request must send exactly it (compared in constant time)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    given = sent.encode() if isinstance(sent, str) else b""
    if not hmac.compare_digest(given, expected):
        raise IncorrectApiKey("Incorrect api key")


# -- routes --------------------------------------------------------------------------------

_DETECT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": {"type": "string", "format": "binary", "description": "the image (JPEG, PNG, ...)"},
                "min_confidence": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.4},
                "api_key": {"type": "string", "description": "required when the server has deepstack.api_key set"},
            },
        }}},
    },
    "responses": {"200": {"description": "predictions, highest confidence first", "content": {"application/json": {
        "example": {"success": True, "count": 1, "predictions": [
            {"label": "dog", "confidence": 0.83, "x_min": 133, "y_min": 207, "x_max": 325, "y_max": 542}]},
    }}}},
}


async def _read_form(request: Request) -> FormData:
    # DeepStack takes multipart (or url-encoded) forms; any other body reads as an empty form.
    refuse_content_encoding(request)
    return await request.form(max_files=4, max_fields=32)


def _field(request: Request, form: FormData, name: str) -> str | None:
    """A field from the form, as DeepStack reads it, or else from the query string (which
    DeepStack does not read; a URL is where some clients put a key). An empty form field
    counts as absent: Frigate sends api_key="" when it has none."""
    value = form.get(name)
    return value if isinstance(value, str) and value.strip() else request.query_params.get(name)


def _provider(request: Request, model: str | None) -> str:
    served = request.app.state.registry.find(model or request.app.state.registry.default_name)
    session = getattr(served, "session", None)
    providers = session.get_providers() if session is not None else []
    name = providers[0] if providers else "CPUExecutionProvider"
    return name.removesuffix("ExecutionProvider") or "CPU"


async def _detect(request: Request, model: str | None, command: str) -> Response:
    start = time.perf_counter()
    settings: DeepStackSettings = request.app.state.settings.deepstack
    service = request.app.state.service
    # As every protocol: admitted before the body is read, X-Timeout-Ms as the deadline, and
    # the work dropped when the client goes away.
    with service.admit():
        deadline = service.deadline(header_timeout_ms(request), received_at(request))
        form = await _read_form(request)
        try:
            check_api_key(_field(request, form, "api_key"), settings)
            uploads = form.getlist("image")
            upload = uploads[0] if uploads else None
            if not isinstance(upload, UploadFile):
                raise MissingImage("No valid image file found")
            data = await upload.read()
            if not data:
                raise MissingImage("No valid image file found")
            min_confidence = parse_min_confidence(_field(request, form, "min_confidence"), settings.min_confidence)
        finally:
            await form.close()
        params = PredictParams(min_confidence=min_confidence, max_detections=settings.max_detections)
        prediction = await unless_disconnected(request.receive, service.detect(model, data, params, deadline=deadline))
    body = detection_response(
        prediction,
        command=command,
        max_detections=settings.max_detections,
        round_trip_ms=(time.perf_counter() - start) * 1e3,
        provider=_provider(request, model),
    )
    return JSONResponse(body, headers=server_timing(prediction.timings_ms))


@router.post("/detection", summary="Detect objects with the default model (DeepStack)", openapi_extra=_DETECT_OPENAPI)
@admitted
async def detection(request: Request) -> Response:
    return await _detect(request, None, "detect")


# GET and POST as two routes, so that each has its own OpenAPI operation id.
@router.get("/custom/list", summary="The models /v1/vision/custom/{model} serves")
@router.post("/custom/list", summary="The models /v1/vision/custom/{model} serves (DeepStack's verb)")
async def custom_list(request: Request) -> dict[str, Any]:
    form = await _read_form(request)
    try:
        check_api_key(_field(request, form, "api_key"), request.app.state.settings.deepstack)
    finally:
        await form.close()
    names = request.app.state.registry.serving()  # those a detection can be sent to now
    return {"success": True, "models": names, "count": len(names), "moduleId": MODULE_ID,
            "command": "list-custom", "code": 200}


@router.post("/custom/{model}", summary="Detect objects with a named model (DeepStack)", openapi_extra=_DETECT_OPENAPI)
@admitted
async def custom(request: Request, model: str) -> Response:
    return await _detect(request, model, "custom")


PROTOCOL = Protocol(
    name="deepstack",
    prefix="/v1/vision",
    router=router,
    render_error=render_error,
    description="DeepStack / CodeProject.AI detection API for Home Assistant, Frigate and Blue Iris",
)
