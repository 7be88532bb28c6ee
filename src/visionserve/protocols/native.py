"""visionserve's own API: status, health, and ``POST /predict``.

Errors are ``{"error": {"code": ..., "message": ...}}`` with the status the error implies.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Mapping

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from visionserve import __version__
from visionserve.errors import InvalidParameter, MissingImage, UnsupportedMediaType
from visionserve.imaging.decode import sniff_format
from visionserve.protocols import (
    Protocol, header_timeout_ms, received_at, refuse_content_encoding, server_timing, weights,
)
from visionserve.server.admission import admitted
from visionserve.server.disconnect import unless_disconnected
from visionserve.types import PredictParams, Prediction

router = APIRouter()

IMAGE_FIELDS = ("image", "file")


def render_error(status: int, code: str, message: str, headers: Mapping[str, str]) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=dict(headers))


class PredictOptions(BaseModel):
    """Parameters of ``/predict``, from the query string or form fields (query wins)."""

    model_config = ConfigDict(extra="ignore")

    min_confidence: float | None = Field(None, ge=0, le=1, description="drop detections below this confidence")
    iou: float | None = Field(None, ge=0, le=1, description="IoU above which NMS drops the weaker of two boxes")
    max_detections: int | None = Field(None, ge=1, le=10_000, description="keep at most this many detections")
    classes: str | None = Field(None, description="comma-separated labels to keep, e.g. 'person,dog'")
    format: Literal["json", "jpeg", "png"] | None = Field(
        None, description="'jpeg' or 'png' returns the image with the detections drawn"
    )

    def params(self) -> PredictParams:
        return PredictParams(self.min_confidence, self.iou, self.max_detections, PredictParams.parse_classes(self.classes))


def _openapi_parameters() -> list[dict[str, Any]]:
    schema = PredictOptions.model_json_schema()["properties"]
    return [
        {"name": name, "in": "query", "required": False, "description": prop.get("description", ""), "schema": prop}
        for name, prop in schema.items()
    ]


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}

_PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": _openapi_parameters(),
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "the image (or field 'file')"},
                        **{k: {"type": "string"} for k in PredictOptions.model_fields},
                    },
                    "required": ["image"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "detections as JSON, or the annotated image with format=jpeg|png",
            "content": {"image/jpeg": {}, "image/png": {}},
        },
        **{
            str(status): {"description": what, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
            for status, what in [
                (400, "missing_image, invalid_image"),
                (404, "model_not_found"),
                (413, "payload_too_large, image_too_large"),
                (415, "unsupported_media_type"),
                (422, "invalid_parameter"),
                (503, "model_not_ready, overloaded (with Retry-After)"),
                (504, "deadline_exceeded"),
            ]
        },
    },
}


# -- status and health ------------------------------------------------------------------


@router.get("/status", summary="Service status, version, uptime, the inference workers and each model's readiness")
async def status(request: Request) -> dict[str, Any]:
    service = request.app.state.service
    return {
        "status": service.state(),
        "version": __version__,
        "uptime_s": round(time.time() - request.app.state.started, 3),
        "default_model": service.registry.default_name,
        "workers": service.scheduler.describe(),
        "models": service.registry.status(),
    }


@router.get("/healthz", summary="Liveness: the process answers, and no worker thread is stuck on one job (503 then)")
async def healthz(request: Request) -> dict[str, str]:
    problem = request.app.state.service.not_live()
    if problem is not None:
        raise problem
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: every configured model is loaded and warmed up (503 until then)")
async def readyz(request: Request) -> dict[str, str]:
    problem = request.app.state.service.not_ready()
    if problem is not None:
        raise problem
    return {"status": "ready"}


# -- prediction -------------------------------------------------------------------------


@router.post("/predict", summary="Detect objects with the default model", openapi_extra=_PREDICT_OPENAPI)
@admitted
async def predict_default(request: Request) -> Response:
    return await _predict(request, None)


@router.post("/predict/{model}", summary="Detect objects with a named model", openapi_extra=_PREDICT_OPENAPI)
@admitted
async def predict_model(request: Request, model: str) -> Response:
    return await _predict(request, model)


async def _predict(request: Request, model: str | None) -> Response:
    service = request.app.state.service
    # Admission before the body is read: a full server refuses at once and for nearly free.
    with service.admit():
        deadline = service.deadline(header_timeout_ms(request), received_at(request))
        service.registry.get(model)  # an unknown or unready model: 404 or 503 before the upload is read
        data, fields = await _read_image(request)
        merged = {**fields, **{k: v for k, v in request.query_params.items() if v != ""}}
        try:
            options = PredictOptions.model_validate(merged)
        except ValidationError as e:
            raise InvalidParameter(
                "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            ) from None
        image_format = options.format or _negotiate(request.headers.get("accept", ""))
        annotated = image_format if image_format != "json" else None
        prediction = await unless_disconnected(
            request.receive,
            service.detect(model, data, options.params(), deadline=deadline, annotated=annotated),
        )
    timing = server_timing(prediction.timings_ms)
    if prediction.rendered is not None:
        return Response(prediction.rendered, media_type=f"image/{image_format}", headers=timing)
    return JSONResponse(prediction_json(prediction), headers=timing)


async def _read_image(request: Request) -> tuple[bytes, dict[str, str]]:
    """The uploaded image bytes and any plain form fields, from multipart or a raw body."""
    refuse_content_encoding(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=4, max_fields=64)
        try:
            # The first part of the first field present, as DeepStack reads its form.
            upload = next((form.getlist(f)[0] for f in IMAGE_FIELDS if f in form), None)
            fields = {k: v for k, v in form.items() if isinstance(v, str) and v != ""}
            if upload is None:
                raise MissingImage("no image: send it as multipart field 'image' (or 'file')")
            if not isinstance(upload, UploadFile):
                raise MissingImage("multipart field 'image' must be a file upload")
            data = await upload.read()
        finally:
            await form.close()
        if not data:
            raise MissingImage("the uploaded image is empty")
        return data, fields
    body = await request.body()
    if ctype == "application/x-www-form-urlencoded" and sniff_format(body) is None:
        # A form without a file (curl --data-binary sends images with this type: sniffed above).
        raise MissingImage("no image: send it as multipart field 'image' or as a raw image body")
    if ctype and not (ctype.startswith("image/") or ctype in ("application/octet-stream", "application/x-www-form-urlencoded")):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {ctype!r}: send multipart/form-data with field 'image', "
            "or the image itself as image/* or application/octet-stream"
        )
    if not body:
        raise MissingImage("no image: the request body is empty")
    return body, {}


def _negotiate(accept: str) -> str:
    """'json', 'jpeg' or 'png' from an Accept header; JSON unless an image type is preferred."""
    q = weights(accept)

    def quality(media: str) -> float:
        kind = media.split("/")[0] + "/*"
        return q.get(media, q.get(kind, q.get("*/*", 0.0)))

    offers = {"json": quality("application/json"), "jpeg": quality("image/jpeg"), "png": quality("image/png")}
    if not q:
        return "json"
    best = max(offers, key=lambda k: offers[k])  # dict order breaks ties in JSON's favour
    return best if offers[best] > 0 else "json"


def prediction_json(p: Prediction) -> dict[str, Any]:
    d = p.detections
    # float64 first, so the rounded values print as short decimals
    boxes = d.boxes.astype(np.float64).round(2).tolist()
    scores = d.scores.astype(np.float64).round(4).tolist()
    return {
        "model": {"name": p.model, "version": p.version},
        "image": {"width": p.image.width, "height": p.image.height, "orientation": p.image.orientation},
        "detections": [
            {"label": label, "class_id": cid, "confidence": s, "box": {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]}}
            for label, cid, s, b in zip(d.label_names(), d.class_ids.tolist(), scores, boxes)
        ],
        "timings_ms": {k: round(v, 2) for k, v in p.timings_ms.items()},
    }


PROTOCOL = Protocol(
    name="native",
    prefix="",
    router=router,
    render_error=render_error,
    description="visionserve's own API: /predict, /status, /healthz, /readyz",
)
