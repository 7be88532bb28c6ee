"""Open Inference Protocol (V2) REST endpoints: health, metadata, inference, model repository.

Every detection model has one input, either ``IMAGE`` (BYTES: encoded images) or ``PIXELS``
(UINT8 RGB), and answers ``BOXES``, ``SCORES``, ``CLASS_IDS``, ``LABELS`` and
``NUM_DETECTIONS``. A batched input (``IMAGE`` [N, 1] or [N>1], ``PIXELS`` [N, H, W, 3])
gets batched outputs, padded to the largest detection count in the batch.
Errors are ``{"error": "message"}``.
"""

from __future__ import annotations

import asyncio
import gzip
import traceback
import zlib
from functools import partial
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from visionserve import __version__
from visionserve.errors import BadRequest, ModelError, ModelNotFound, ModelNotReady
from visionserve.protocols import Protocol, positive_finite, received_at, server_timing, weights
from visionserve.protocols.v2.codec import (
    InferRequest,
    OutputTensor,
    Tensor,
    decompress,
    encode_output,
    encode_response,
    json_containers,
    json_length,
    json_problem,
    parse_infer_request,
    parse_json,
    split_body,
    wants_binary,
)
from visionserve.runtime.model import ModelState, ServedModel
from visionserve.server.admission import admitted
from visionserve.server.collector import collector_paused
from visionserve.server.disconnect import unless_disconnected
from visionserve.types import PredictParams, Prediction

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

EXTENSIONS = ["binary_tensor_data", "model_repository"]
HEADER_LENGTH = "Inference-Header-Content-Length"
INPUTS = {"IMAGE": "BYTES", "PIXELS": "UINT8"}
INPUT_METADATA = [
    {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
    {"name": "PIXELS", "datatype": "UINT8", "shape": [-1, -1, 3]},
]
OUTPUT_METADATA = [
    {"name": "BOXES", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "SCORES", "datatype": "FP32", "shape": [-1]},
    {"name": "CLASS_IDS", "datatype": "INT32", "shape": [-1]},
    {"name": "LABELS", "datatype": "BYTES", "shape": [-1]},
    {"name": "NUM_DETECTIONS", "datatype": "INT32", "shape": [1]},
]
OUTPUT_NAMES = [o["name"] for o in OUTPUT_METADATA]
# Bodies up to this size are decoded on the event loop (a few ms at most); larger or
# compressed ones in a worker thread, cooperatively (codec.split_body says why), so that a
# JSON body of millions of numbers does not stop the server answering everyone else.
INLINE_BODY_BYTES = 1 << 20
# ... and when they hold few JSON arrays, objects and strings: the parser makes those in C
# without a pause, a megabyte of `[[],[],...]` in 0.1 s or more (codec.parse_json).
INLINE_JSON_CONTAINERS = 1 << 15
T = TypeVar("T")
# V2 has no 422; a bad parameter is a bad request there.
_STATUS = {422: 400}


def render_error(status: int, code: str, message: str, headers: Mapping[str, str]) -> Response:
    return JSONResponse({"error": message}, status_code=_STATUS.get(status, status), headers=dict(headers))


# -- server ------------------------------------------------------------------------------


@router.get("", summary="Server metadata: name, version and supported extensions")
async def server_metadata() -> dict[str, Any]:
    return {"name": "visionserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server liveness (503 while a worker thread is stuck on one job)")
async def server_live(request: Request) -> Response:
    live = request.app.state.service.not_live() is None
    return JSONResponse({"live": live}, status_code=200 if live else 503)


@router.get("/health/ready", summary="Server readiness: every configured model is ready (503 until then)")
async def server_ready(request: Request) -> Response:
    ready = request.app.state.service.not_ready() is None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


# -- models ------------------------------------------------------------------------------


def _served(request: Request, name: str, version: str | None) -> ServedModel:
    """The model by name whatever its state (not-ready models still have metadata)."""
    registry = request.app.state.registry
    model = registry.find(name)
    if model is None:
        # Not loaded at all: get() says precisely why (unknown, still loading, or failed).
        return registry.get(name)
    if version is not None and version != model.version:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has version {model.version!r}")
    return model


def _metadata(model: ServedModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnx_onnxv1",
        "inputs": INPUT_METADATA,
        "outputs": OUTPUT_METADATA,
    }


@router.get("/models/{name}", summary="Model metadata: inputs and outputs")
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _metadata(_served(request, name, None))


@router.get("/models/{name}/versions/{version}", summary="Model metadata for one version")
async def model_version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return _metadata(_served(request, name, version))


async def _model_ready(request: Request, name: str, version: str | None) -> Response:
    """200 ``{"name", "ready": true}``, or 503 ``{"name", "ready": false, "reason"}`` whatever
    kept it from being ready (loading, unloaded, failed: the same words as its inference)."""
    try:
        if _served(request, name, version).state is not ModelState.READY:
            request.app.state.registry.get(name)  # raises ModelNotReady, saying why (unless ready meanwhile)
    except ModelNotReady as e:
        return JSONResponse({"name": name, "ready": False, "reason": e.message}, status_code=503)
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/ready", summary="Model readiness (503 while not ready)")
async def model_ready(request: Request, name: str) -> Response:
    return await _model_ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness (503 while not ready)")
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return await _model_ready(request, name, version)


# -- inference ---------------------------------------------------------------------------

_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "An inference request: JSON, or (binary tensor extension) JSON followed by the raw tensors, "
            f"with the JSON's length in the {HEADER_LENGTH} header. gzip/deflate bodies are accepted. "
            "Request parameters: min_confidence, iou, max_detections, classes (comma-separated labels)."
        ),
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": {"type": "object"}},
                    "outputs": {"type": "array", "items": {"type": "object"}},
                }},
                "example": {
                    "parameters": {"min_confidence": 0.4},
                    "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                "parameters": {"content_type": "base64"}, "data": ["<base64 JPEG>"]}],
                },
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {"200": {
        "description": f"inference response; binary outputs follow the JSON ({HEADER_LENGTH} gives its length)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }},
}


class InferParameters(BaseModel):
    """The request parameters this server reads; others (Triton's priority...) are ignored.

    ``timeout`` (microseconds, as in Triton) is the request's deadline, read by ``_deadline``.
    """

    model_config = ConfigDict(extra="ignore")

    # Strict: JSON true is not 1 here (pydantic's lax mode reads it so), nor "0.5" a number.
    min_confidence: float | None = Field(None, ge=0, le=1, strict=True)
    iou: float | None = Field(None, ge=0, le=1, strict=True)
    max_detections: int | None = Field(None, ge=1, le=10_000, strict=True)
    classes: str | list[str] | None = None

    def params(self) -> PredictParams:
        return PredictParams(self.min_confidence, self.iou, self.max_detections, PredictParams.parse_classes(self.classes))


@router.post("/models/{name}/infer", summary="Detect objects (Open Inference Protocol)", openapi_extra=_INFER_OPENAPI)
@admitted
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Detect objects with one model version",
    openapi_extra=_INFER_OPENAPI,
)
@admitted
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _every_one(jobs: list[Awaitable[Prediction]]) -> list[Prediction]:
    """Every job's prediction, in order. On the first failure the others are cancelled, their
    queued work dropped, before the failure is raised: gather left them queued after the
    request had given its places back, past the server's capacity."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # gone before the places are
        raise


async def _infer(request: Request, name: str, version: str | None) -> Response:
    settings = request.app.state.settings
    model = request.app.state.registry.get(name)
    if version is not None and version != model.version:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has version {model.version!r}")
    body = await request.body()
    encoding = request.headers.get("content-encoding")
    header_length = request.headers.get(HEADER_LENGTH)
    check = partial(_check_input, model=name, max_batch=settings.v2.max_batch_size)
    decode = partial(_decode, body, encoding, header_length, settings.limits.max_body_bytes, check)
    compressed = _compressed(encoding)
    # Only the JSON header is JSON: binary tensor data (images) after it is not worth scanning.
    json_text = body if compressed else memoryview(body)[: json_length(len(body), header_length)]
    infer_request = await _decoded(request, decode, json_text, len(body), compressed)
    params = _predict_params(infer_request.parameters)
    requested = _requested_outputs(infer_request)
    tensor = _single_input(infer_request.inputs, name)
    images, batched = _images(tensor, settings.v2.max_batch_size)

    service = request.app.state.service
    deadline = service.deadline(_timeout_ms(infer_request.parameters), received_at(request))
    # The request's place (taken before its body was read) covers all its images, and holds
    # more places while they run (Scheduler.admit); a client that disconnects has its queued
    # images dropped.
    with service.admit(len(images)):
        if tensor.datatype == "BYTES":
            jobs = [service.detect(name, data, params, deadline=deadline) for data in images]
        else:
            jobs = [service.detect_pixels(name, pixels, params, deadline=deadline) for pixels in images]
        predictions: list[Prediction] = await unless_disconnected(request.receive, _every_one(jobs))

    tensors = {t.name: t for t in _output_tensors(predictions, batched)}
    entries, chunks = [], []
    for out_name, out_params in requested:
        entry, raw = encode_output(tensors[out_name], wants_binary(infer_request.parameters, out_params))
        entries.append(entry)
        if raw is not None:
            chunks.append(raw)
    header: dict[str, Any] = {"model_name": name, "model_version": model.version, "outputs": entries}
    if infer_request.id is not None:
        header["id"] = infer_request.id
    payload, json_bytes = encode_response(header, chunks)
    headers = {} if json_bytes is None else {HEADER_LENGTH: str(json_bytes)}
    # A batch's images run side by side: each stage as long as its slowest image's.
    headers |= server_timing({stage: max(p.timings_ms.get(stage, 0.0) for p in predictions)
                              for stage in predictions[0].timings_ms})
    payload = _compress(payload, request.headers.get("accept-encoding", ""), headers)
    media_type = "application/json" if json_bytes is None else "application/octet-stream"
    return Response(payload, media_type=media_type, headers=headers)


def _decode(
    body: bytes, encoding: str | None, header_length: str | None, max_bytes: int, check: Any, cooperative: bool
) -> InferRequest:
    body = decompress(body, encoding, max_bytes)
    return parse_infer_request(*split_body(body, header_length, cooperative), check, cooperative)


def _compressed(encoding: str | None) -> bool:
    return (encoding or "identity").strip().lower() not in ("", "identity")


async def _decoded(
    request: Request, decode: Callable[[bool], T], json_text: bytes | memoryview, size: int, compressed: bool
) -> T:
    """``decode(cooperative)``'s result: inline for a small body (``size`` bytes, of which
    ``json_text`` is JSON) with few JSON containers, else in a worker thread."""
    if not compressed and size <= INLINE_BODY_BYTES and json_containers(json_text) <= INLINE_JSON_CONTAINERS:
        return decode(False)
    return await request.app.state.service.scheduler.run_aux(_cooperatively, decode)


def _cooperatively(decode: Callable[[bool], T]) -> T:
    """``decode(True)`` in a worker thread, the garbage collector paused (server/collector.py),
    and what it parsed freed here, not on the event loop, when it fails: a traceback holds
    its frames, and their locals the parsed body, until the exception is let go of."""
    with collector_paused():
        try:
            return decode(True)
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)
            raise


def _timeout_ms(parameters: Mapping[str, Any] | None) -> float | None:
    """The ``timeout`` request parameter (microseconds) in milliseconds; 0 is none, as in Triton."""
    raw = (parameters or {}).get("timeout")
    if raw is None or (raw == 0 and not isinstance(raw, bool)):
        return None
    value = None if isinstance(raw, bool) or not isinstance(raw, (int, float)) else positive_finite(raw)
    if value is None:
        shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:40] + "..."  # a JSON integer can be any length
        raise BadRequest(f"parameter timeout must be a finite number of microseconds (0: none), got {shown}")
    return value / 1e3


def _predict_params(parameters: Mapping[str, Any]) -> PredictParams:
    try:
        return InferParameters.model_validate(parameters).params()
    except ValidationError as e:
        raise BadRequest(
            "invalid request parameters: "
            + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        ) from None


# Output parameters of extensions this server does not have: refused, not ignored, or a
# client would read results it did not ask for (scores for classes) or none at all (a region).
_UNSUPPORTED_OUTPUT_PARAMETERS = {
    "classification": "the classification extension",  # Triton's; tritonclient's class_count
    "class_count": "the classification extension",
    "shared_memory_region": "the shared-memory extensions",
    "shared_memory_byte_size": "the shared-memory extensions",
    "shared_memory_offset": "the shared-memory extensions",
}


def _requested_outputs(req: InferRequest) -> list[tuple[str, Mapping[str, Any] | None]]:
    if not req.outputs:  # none named (or an empty list, as Triton reads it): all of them
        return [(n, None) for n in OUTPUT_NAMES]
    chosen = []
    for out in req.outputs:
        if out["name"] not in OUTPUT_NAMES:
            raise BadRequest(f"unknown output {out['name']!r}; this model has {', '.join(OUTPUT_NAMES)}")
        params = out.get("parameters") or {}
        for key in params:
            if key in _UNSUPPORTED_OUTPUT_PARAMETERS:
                raise BadRequest(f"output {out['name']!r}: {_UNSUPPORTED_OUTPUT_PARAMETERS[key]} ({key}) is not supported")
        chosen.append((out["name"], params))
    return chosen


def _check_input(name: str, datatype: str, shape: tuple[int, ...], model: str, max_batch: int) -> None:
    """The input is one of the model's, of its datatype, with a shape it takes and at most
    ``max_batch`` images: from what the request declares, before any of its data is decoded."""
    expected = INPUTS.get(name)
    if expected is None:
        raise BadRequest(
            f"unknown input {name!r} for model {model!r}: send IMAGE (BYTES, encoded images) "
            "or PIXELS (UINT8, [H, W, 3] or [N, H, W, 3] RGB)"
        )
    if datatype != expected:
        raise BadRequest(f"input {name!r} must be {expected}, got {datatype}")
    _batched(name, shape, max_batch)


def _single_input(inputs: list[Tensor], model: str) -> Tensor:
    if len(inputs) != 1:
        raise BadRequest(f"model {model!r} takes exactly one input, IMAGE or PIXELS; got {len(inputs)}")
    return inputs[0]


def _batched(name: str, shape: tuple[int, ...], max_batch: int) -> bool:
    """Whether an input of this shape carries a batch dimension; 400 for a shape the model
    does not take, or with no image or more than ``max_batch``."""
    if name == "IMAGE":
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"IMAGE must have shape [N] or [N, 1], got {list(shape)}")
        batched = len(shape) == 2 or (len(shape) == 1 and shape[0] > 1)
        count = shape[0] if shape else 1
    else:
        if len(shape) not in (3, 4) or shape[-1] != 3:
            raise BadRequest(f"PIXELS must have shape [H, W, 3] or [N, H, W, 3], got {list(shape)}")
        batched = len(shape) == 4
        count = shape[0] if batched else 1
    if count == 0:
        raise BadRequest(f"{name} holds no image")
    if count > max_batch:
        raise BadRequest(f"{count} images in one request; the limit is {max_batch}")
    return batched


def _images(tensor: Tensor, max_batch: int) -> tuple[list[Any], bool]:
    """The images of the input and whether the input carries a batch dimension."""
    batched = _batched(tensor.name, tensor.shape, max_batch)
    if tensor.name == "IMAGE":
        return list(tensor.data), batched
    array = tensor.data
    return (list(array) if batched else [array]), batched  # type: ignore[arg-type]


def _output_tensors(predictions: list[Prediction], batched: bool) -> list[OutputTensor]:
    detections = [p.detections for p in predictions]
    counts = np.array([len(d) for d in detections], np.int32)
    if not batched:
        (d,) = detections
        return [
            OutputTensor("BOXES", "FP32", array=d.boxes.astype(np.float32, copy=False).reshape(-1, 4)),
            OutputTensor("SCORES", "FP32", array=d.scores.astype(np.float32, copy=False)),
            OutputTensor("CLASS_IDS", "INT32", array=d.class_ids.astype(np.int32, copy=False)),
            OutputTensor("LABELS", "BYTES", items=[s.encode() for s in d.label_names()], shape=(len(d),)),
            OutputTensor("NUM_DETECTIONS", "INT32", array=counts),
        ]
    # Pad each image's detections to the batch's largest count: boxes and scores 0, class -1, label "".
    n, k = len(detections), int(counts.max(initial=0))
    boxes = np.zeros((n, k, 4), np.float32)
    scores = np.zeros((n, k), np.float32)
    class_ids = np.full((n, k), -1, np.int32)
    labels: list[bytes] = []
    for i, d in enumerate(detections):
        boxes[i, : len(d)] = d.boxes
        scores[i, : len(d)] = d.scores
        class_ids[i, : len(d)] = d.class_ids
        names = [s.encode() for s in d.label_names()]
        labels += names + [b""] * (k - len(names))
    return [
        OutputTensor("BOXES", "FP32", array=boxes),
        OutputTensor("SCORES", "FP32", array=scores),
        OutputTensor("CLASS_IDS", "INT32", array=class_ids),
        OutputTensor("LABELS", "BYTES", items=labels, shape=(n, k)),
        OutputTensor("NUM_DETECTIONS", "INT32", array=counts),
    ]


def _compress(payload: bytes, accept_encoding: str, headers: dict[str, str]) -> bytes:
    """gzip or deflate (zlib) the response when the client asks for it (tritonclient can)."""
    q = weights(accept_encoding)
    gzip_q, deflate_q = q.get("gzip", q.get("x-gzip", 0.0)), q.get("deflate", 0.0)
    if gzip_q > 0 and gzip_q >= deflate_q:  # "gzip;q=0" refuses it
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(payload, compresslevel=5)
    if deflate_q > 0:
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(payload, 5)
    return payload


# -- model repository extension ----------------------------------------------------------


async def _json_object(request: Request, what: str) -> dict[str, Any]:
    """An optional JSON object body; empty means {}."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        value = await _decoded(request, partial(parse_json, body), body, len(body), False)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply for the parser
        raise BadRequest(f"the {what} request is not valid JSON: {json_problem(e)}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the {what} request must be a JSON object")
    return value


_STATES = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADED: "UNAVAILABLE",
}


@router.post("/repository/index", summary="Every model this server can serve, loaded or not")
async def repository_index(request: Request) -> list[dict[str, Any]]:
    body = await _json_object(request, "repository index")
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequest("'ready' must be a boolean")
    registry = request.app.state.registry
    index: dict[str, dict[str, Any]] = {}
    for entry in registry.status():
        model = registry.find(entry["name"])
        state = _STATES[model.state] if model is not None else ("UNAVAILABLE" if "error" in entry else "LOADING")
        reason = entry.get("error") or ("unloaded" if model is not None and model.state is ModelState.UNLOADED else "")
        item = {"name": entry["name"], "state": state, "reason": reason}
        if "version" in entry:
            item["version"] = entry["version"]
        index[entry["name"]] = item
    # Installed in the model store but not (yet) served: loadable with the load API. A broken
    # manifest makes its model unavailable, not the index (its message names no server file).
    def broken(folder: str, error: ModelError) -> None:
        index.setdefault(folder, {"name": folder, "state": "UNAVAILABLE", "reason": error.message})

    for manifest in registry.store.installed(broken=broken):
        index.setdefault(manifest.name, {"name": manifest.name, "version": manifest.version,
                                         "state": "UNAVAILABLE", "reason": "not loaded"})
    items = sorted(index.values(), key=lambda i: i["name"])
    return [i for i in items if i["state"] == "READY"] if ready_only else items


def _check_repository_parameters(body: dict[str, Any], allowed: set[str]) -> None:
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be a JSON object")
    unsupported = sorted(set(params) - allowed)
    if unsupported:
        raise BadRequest(f"unsupported parameter(s): {', '.join(unsupported)}")


@router.post("/repository/models/{name}/load", summary="Load (or reload) a configured, installed or catalog model")
async def repository_load(request: Request, name: str) -> dict[str, Any]:
    _check_repository_parameters(await _json_object(request, "load"), set())
    model = await asyncio.to_thread(request.app.state.registry.load, name)
    return {"name": name, "version": model.version, "load": True}


@router.post("/repository/models/{name}/unload", summary="Unload a model")
async def repository_unload(request: Request, name: str) -> dict[str, Any]:
    _check_repository_parameters(await _json_object(request, "unload"), {"unload_dependents"})
    # In a thread, as a load is: it waits for a load of the same model under way, whose
    # workers answer on the event loop.
    await asyncio.to_thread(request.app.state.registry.unload, name)
    return {"name": name, "unload": True}


PROTOCOL = Protocol(
    name="v2",
    prefix="/v2",
    router=router,
    render_error=render_error,
    description="Open Inference Protocol (KServe V2 / Triton) with the binary tensor and model repository extensions",
)
