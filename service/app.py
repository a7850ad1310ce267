"""The app factory: lifespan (load, warm, batch; then drain and stop), error handlers, routers."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service import __version__, runtimes, workers
from service.api import feedback as feedback_api
from service.api import kserve, native, tfserving
from service.api import rollout as rollout_api
from service.api.deps import BODY_MODELS, ORJSONResponse, error_response
from service.errors import ServiceError
from service.feedback import RecentImages, RequestLog
from service.loading import Loader
from service.metrics import MULTIPROCESS, Metrics
from service.middleware import ServiceMiddleware
from service.pipeline import ClientGone
from service.registry import Registry
from service.settings import Settings
from service.workers import Board

if TYPE_CHECKING:
    from service.rpc.server import RpcServer

logger = logging.getLogger(__name__)

DESCRIPTION = """Image classification with a dynamic micro-batcher.

* **Native API**: `POST /predict` with one or more images, `GET /v1/models`.
* **TensorFlow Serving REST**: `POST /v1/models/{model}:predict` with `{"instances": [{"b64": ...}]}`.
* **KServe v2 / Open Inference Protocol**: `POST /v2/models/{model}/infer` (works with `tritonclient.http`).

Errors are JSON: `{"error": "what went wrong", "code": "machine_readable"}`.
"""


def _error_body(message: str, code: str, **extra: object) -> dict[str, object]:
    return {"error": message, "code": code, **extra}


async def _post_state(app: FastAPI, board: Board | None, metrics: Metrics) -> None:
    """Keep this process's post on the board current (on change, and every second as a heartbeat),
    and its own memory gauge."""
    last: tuple[object, ...] | None = None
    posted = 0.0
    while True:
        registry = getattr(app.state, "registry", None)
        models = registry.versions() if registry is not None else {}
        ready = registry is not None and registry.ready
        now = (ready, bool(app.state.draining), tuple(sorted(models.items())))
        if now != last or time.monotonic() - posted >= workers.HEARTBEAT_S:
            if board is not None:
                why = registry.waiting_for() if registry is not None else "no model is loaded yet"
                board.post(workers.WorkerState(board.slot.index, os.getpid(), ready, bool(app.state.draining),
                                               why, models))
            last, posted = now, time.monotonic()
            metrics.process_rss.set(workers.rss_bytes())
        await asyncio.sleep(0.05)


async def _start_grpc(app: FastAPI, settings: Settings, *, reuse_port: bool) -> RpcServer | None:
    """gRPC beside HTTP on IMGSERVE_GRPC_PORT (0: off), on this event loop, serving from the same state."""
    if not settings.grpc_port:
        return None
    from service.rpc import kserve as rpc_kserve
    from service.rpc import tfserving as rpc_tfserving
    from service.rpc.server import RpcServer

    server = RpcServer(app.state, settings, reuse_port=reuse_port)
    rpc_kserve.register(server)
    rpc_tfserving.register(server)
    app.state.grpc_port = await server.start(settings.host, settings.grpc_port)
    return server


def _answer_records(app: FastAPI, settings: Settings, slot: workers.WorkerSlot | None) -> None:
    """The recent-images buffer and the request log, each when turned on (service/feedback.py)."""
    app.state.recent = app.state.request_log = None
    if settings.recent_images_mb > 0:
        if settings.feedback_dir is None:
            logger.warning("IMGSERVE_RECENT_IMAGES_MB without IMGSERVE_FEEDBACK_DIR: no recent images are kept")
        else:
            app.state.recent = RecentImages(settings.feedback_dir, int(settings.recent_images_mb * 2**20))
            logger.info("keeping up to %g MB of recent images for feedback in %s", settings.recent_images_mb,
                        app.state.recent.mine)
    if settings.request_log:
        app.state.request_log = RequestLog(settings.request_log, int(settings.request_log_max_mb * 2**20),
                                           settings.request_log_images,
                                           slot.index if slot is not None and slot.count > 1 else None)
        logger.info("request log: %s", app.state.request_log.path or "standard output")


def _lifespan(settings: Settings, metrics: Metrics, loader: Loader | None) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        slot = workers.WorkerSlot.from_env()
        app.state.board = board = workers.Board(slot) if slot is not None else None
        metrics.processes.set(1)
        poster = asyncio.get_running_loop().create_task(_post_state(app, board, metrics), name="board")
        device = runtimes.configure(settings) if loader is None else "custom loader"
        logger.info("device: %s", device)
        logger.info("batching defaults: %s", settings.batching)
        app.state.device = device
        app.state.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        _answer_records(app, settings, slot)
        registry = Registry(settings, metrics, loader or functools.partial(runtimes.load, settings=settings))
        app.state.registry = registry
        logger.info("model store: %s", settings.model_store.resolve())
        if slot is not None and slot.restarted:
            # The other processes are serving: take no connection from them (uvicorn listens only
            # after this startup) until this one can answer too.
            await registry.scan()
        registry.start_polling()
        rpc = await _start_grpc(app, settings, reuse_port=slot is not None)
        try:
            yield
        finally:
            app.state.draining = True
            metrics.ready.set(0)
            logger.info("draining: finishing queued rows (up to %.1fs)", settings.drain_timeout_s)
            if rpc is not None:  # its calls in flight finish first: they need the batchers
                await rpc.stop(settings.drain_timeout_s)
            await registry.stop(settings.drain_timeout_s)
            app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
            for part in (app.state.recent, app.state.request_log):
                if part is not None:
                    part.close()
            poster.cancel()
            logger.info("stopped")

    return lifespan


def _error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        if exc.status_code >= 500 and exc.status_code not in (503, 504):
            logger.error("request %s failed: %s", request.url.path, exc.message)
        return error_response(exc)

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
    @app.exception_handler(ClientDisconnect)  # gone while its body was being read
    async def client_gone(request: Request, exc: Exception) -> Response:
        metrics.rejections.labels("client_gone").inc()
        return Response(status_code=499)


def _with_body_schemas(app: FastAPI) -> None:
    """Routes that parse their own JSON bodies name a pydantic model; put its schema in the document."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = plain()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, model in BODY_MODELS.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[name] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


OTEL_OFF = {"tracing": False, "metrics": False, "logs": False}  # FastAPI's per-request checks, when unused


def create_app(settings: Settings | None = None, loader: Loader | None = None) -> FastAPI:
    """The service; `loader(path, meta)` replaces the runtimes (tests pass a fake one)."""
    settings = settings or Settings.load()
    metrics = Metrics()
    if not MULTIPROCESS:  # process_* series describe one process; with several, see process_rss
        ProcessCollector(registry=metrics.registry)
    app = FastAPIOffline(title="imgserve", version=__version__, description=DESCRIPTION,
                         lifespan=_lifespan(settings, metrics, loader), default_response_class=ORJSONResponse,
                         telemetry=None if settings.opentelemetry else OTEL_OFF)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False
    _error_handlers(app, metrics)
    for router in (native.router, tfserving.router, kserve.router, rollout_api.router, feedback_api.router):
        app.include_router(router)
    _with_body_schemas(app)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)",
             response_class=PlainTextResponse)
    async def metrics_text() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(native.FastPath)  # inside ServiceMiddleware: its limits, IDs and metrics hold for both
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_upload_bytes,
                       body_timeout_s=settings.body_timeout_s, draining=lambda: bool(app.state.draining),
                       metrics=metrics, inflight_limit=settings.inflight_limit)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Model-Name", "X-Model-Version", "X-Model-Runtime",
                                                                "X-Model-Role",
                                                                "X-Request-ID", "Server-Timing"])
    return app
