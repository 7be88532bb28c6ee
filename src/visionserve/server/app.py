"""The ASGI application: protocols mounted, middleware, model loading on start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.requests import Request
from starlette.responses import Response

from visionserve import __version__
from visionserve.config import Settings
from visionserve.metrics import CONTENT_TYPE, Metrics
from visionserve.protocols import discover, renderer_for
from visionserve.runtime.registry import ModelRegistry
from visionserve.runtime.scheduler import Scheduler
from visionserve.runtime.workers import WorkerPool
from visionserve.server import web
from visionserve.server.admission import AdmissionGateMiddleware, AdmittedRoutes
from visionserve.server.refusal import Refusals
from visionserve.server.errors import install_error_handlers
from visionserve.server.head import HeadAsGetMiddleware
from visionserve.server.middleware import BodyLimitMiddleware, RequestContextMiddleware
from visionserve.service import DetectionService
from visionserve.store.store import ModelStore

log = logging.getLogger("visionserve")


def create_app(settings: Settings, workers: WorkerPool | None = None) -> FastAPI:
    """The app for these settings; ``workers``: inference processes already started for them."""
    store = ModelStore(settings.model_dir, mirror=settings.model_mirror)
    metrics = Metrics()
    scheduler = Scheduler(settings.runtime, settings.queue, metrics, workers)
    registry = ModelRegistry(settings, store, workers=scheduler.processes)
    service = DetectionService(settings, registry, scheduler)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Models load in the background so /healthz answers at once and /readyz says when
        # they are warm. The inference process starts first, so it loads them itself.
        scheduler.start()
        loading = asyncio.create_task(asyncio.to_thread(registry.load_configured))
        yield
        if not loading.done():
            loading.cancel()
        scheduler.shutdown()

    # FastAPI's /docs page loads Swagger UI from a CDN, and is blank on an air-gapped machine;
    # FastAPIOffline serves the same page with Swagger UI's files from its package.
    app = FastAPIOffline(
        title="visionserve",
        version=__version__,
        description="Object detection over HTTP: upload an image, get labels, confidences and boxes.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs/static",
        # "/predict/" is not "/predict": a JSON 404, not Starlette's redirect, whose Location
        # would be built from the client's own Host header.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.service = service
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.started = time.time()

    protocols = discover()
    pick = partial(renderer_for, protocols=protocols)
    for proto in protocols:
        app.include_router(proto.router)
    app.include_router(web.router)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    install_error_handlers(app, pick)
    app.add_middleware(HeadAsGetMiddleware, routes=lambda: app.routes)
    # From the protocols' own routers: since FastAPI 0.165 the app's route list holds each
    # included router as one opaque entry, so it shows no detection route to match.
    detection_routes = AdmittedRoutes(lambda: [route for proto in protocols for route in proto.router.routes])
    app.add_middleware(AdmissionGateMiddleware, scheduler=scheduler, routes=detection_routes, renderer_for=pick)
    # Outside the gate: the body's time limit covers its bytes, not a complete slow upload's
    # wait for a place again (which ends in 503 at queue.upload_hold_ms).
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes, renderer_for=pick,
        timeout_s=settings.limits.body_timeout_s,
    )
    # The same refusal, earlier still: in the HTTP parser (used by ``serve``).
    app.state.refusals = Refusals(
        scheduler, metrics, detection_routes, pick, settings.limits.max_body_bytes, settings.limits.body_timeout_s,
        settings.queue.refusal_pause_ms / 1e3,
    )
    app.add_middleware(RequestContextMiddleware, renderer_for=pick, access=settings.access_log, metrics=metrics)
    return app
