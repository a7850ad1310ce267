"""The app factory: lifespan (load, warm, batch; then drain and stop), error handlers, routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import ProcessCollector
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.exceptions import HTTPException

from service import __version__
from service.api import native
from service.api.deps import ORJSONResponse
from service.errors import ServiceError
from service.inference import ClientGone
from service.metrics import Metrics
from service.middleware import ServiceMiddleware
from service.registry import Loader, Registry, default_loader
from service.settings import Settings

logger = logging.getLogger(__name__)

DESCRIPTION = """Image classification with a dynamic micro-batcher.

* **Native API**: `POST /predict` with one or more images, `GET /v1/models`.
* **TensorFlow Serving REST**: `POST /v1/models/{model}:predict` with `{"instances": [{"b64": ...}]}`.
* **KServe v2 / Open Inference Protocol**: `POST /v2/models/{model}/infer` (works with `tritonclient.http`).

Errors are JSON: `{"error": "what went wrong", "code": "machine_readable"}`.
"""


def _error_body(message: str, code: str, **extra: object) -> dict[str, object]:
    return {"error": message, "code": code, **extra}


def create_app(settings: Settings | None = None, loader: Loader | None = None) -> FastAPI:
    settings = settings or Settings.load()
    metrics = Metrics()
    ProcessCollector(registry=metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is None:
            from service.model import configure_tensorflow

            device = configure_tensorflow(settings.intra_op_threads, settings.inter_op_threads,
                                          settings.mixed_precision)
        else:
            device = "custom loader"
        logger.info("device: %s", device)
        logger.info("batching: max_batch_size=%d max_batch_delay_ms=%.1f batches_in_flight=%d max_queue_rows=%d "
                    "warm-up sizes %s",
                    settings.max_batch_size, settings.max_batch_delay_ms, settings.batches_in_flight,
                    settings.max_queue_rows,
                    settings.warmup_sizes)
        app.state.device = device
        app.state.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        registry = Registry(settings, metrics, loader or default_loader)
        app.state.registry = registry
        logger.info("model store: %s", settings.model_store.resolve())
        registry.start_polling()
        try:
            yield
        finally:
            app.state.draining = True
            metrics.ready.set(0)
            logger.info("draining: finishing queued rows (up to %.1fs)", settings.drain_timeout_s)
            await registry.stop(settings.drain_timeout_s)
            app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
            logger.info("stopped")

    app = FastAPIOffline(
        title="imgserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        if exc.status_code >= 500 and exc.status_code not in (503, 504):
            logger.error("request %s failed: %s", request.url.path, exc.message)
        return ORJSONResponse(_error_body(exc.message, exc.code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        metrics.rejections.labels("invalid_request").inc()
        return ORJSONResponse(_error_body(f"invalid request: {problems}", "invalid_request"), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}.get(exc.status_code, "http_error")
        return ORJSONResponse(_error_body(str(exc.detail), code), status_code=exc.status_code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        metrics.rejections.labels("client_gone").inc()
        return Response(status_code=499)

    app.include_router(native.router)
    from service.api import kserve, tfserving

    app.include_router(tfserving.router)
    app.include_router(kserve.router)

    Instrumentator(registry=metrics.registry, excluded_handlers=["/metrics"], should_group_status_codes=False) \
        .instrument(app, metric_namespace="imgserve") \
        .expose(app, include_in_schema=True, tags=["health"], response_class=PlainTextResponse,
                summary="Prometheus metrics (text exposition format)")

    def reject(reason: str) -> None:
        metrics.rejections.labels(reason).inc()

    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_upload_bytes,
                       body_timeout_s=settings.body_timeout_s,
                       draining=lambda: bool(app.state.draining), on_reject=reject)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Model-Name", "X-Model-Version",
                                                                "X-Request-ID", "Server-Timing"])
    return app
