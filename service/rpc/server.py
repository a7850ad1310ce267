"""The gRPC server: one `grpc.aio` server on the lifespan's event loop, sharing its registry, batchers,
decode pool, settings and metrics with the HTTP side.

Each method is a coroutine `handler(request, rpc) -> response` (service/rpc/kserve.py, tfserving.py);
`unary` wraps it with what every call gets, as the HTTP middleware and dependencies do: parsing (a
malformed message is INVALID_ARGUMENT), the API key, the draining check, the deadline, the ServiceError
to status-code mapping, trailing metadata, and the `imgserve_grpc_*` metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.auth import key_matches
from service.errors import BadRequest, DeadlineExpired, NotReady, Overloaded, ServiceError, Unauthorized
from service.pipeline import (
    ROUTE_KEY_HEADER,
    TIMEOUT_HEADER,
    Call,
    Outcome,
    Serving,
    deadline_for,
    not_ready,
    request_id,
)
from service.registry import Registry
from service.rpc import protos
from service.settings import Settings

logger = logging.getLogger(__name__)

# how the HTTP statuses of ServiceError map to gRPC codes (the same errors, the same messages)
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
         413: grpc.StatusCode.INVALID_ARGUMENT, 415: grpc.StatusCode.INVALID_ARGUMENT,
         422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
HEALTH_SERVICES = ("", protos.KSERVE, protos.PREDICTION, protos.MODEL_SERVICE)


@dataclass
class Rpc:
    """One gRPC call as a handler sees it."""

    serving: Serving
    context: grpc.aio.ServicerContext[Any, Any]
    metadata: dict[str, str]
    trailers: dict[str, str] = field(default_factory=dict)
    request_id: str = ""  # a stream's message: its own ID (model_stream_infer); else the call's x-request-id

    def call(self) -> Call:
        """The pipeline's view: the earlier of the caller's gRPC deadline (capped at the longest allowed) and
        the x-request-timeout-ms metadata, else the default; cancellation needs no watcher (grpc cancels the task)."""
        settings: Settings = self.serving.settings
        deadline = deadline_for(self.metadata.get(TIMEOUT_HEADER), settings)
        remaining = self.context.time_remaining()
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExpired("the call's deadline passed before it could be queued")
            deadline = min(deadline if TIMEOUT_HEADER in self.metadata else math.inf,
                           time.monotonic() + min(remaining, settings.max_request_timeout_ms / 1000))
        return Call(self.serving, deadline, "grpc", self.metadata.get(ROUTE_KEY_HEADER),
                    request_id=self.request_id or self.trailers["x-request-id"])

    def registry(self) -> Registry:
        registry: Registry | None = getattr(self.serving, "registry", None)
        if registry is None:
            raise NotReady("the service is starting")
        return registry

    def admit(self) -> None:
        """Refuse the call (RESOURCE_EXHAUSTED) when, counting itself, the process works on more requests of any
        protocol than IMGSERVE_MAX_INFLIGHT_REQUESTS, as HTTP refuses a POST with 429; not while draining."""
        metrics, limit = self.serving.metrics, self.serving.settings.inflight_limit
        if metrics.requests_in_progress > limit and not getattr(self.serving, "draining", False):
            metrics.rejections.labels("busy").inc()
            raise Overloaded(f"the server is at capacity ({limit} requests in progress in this process); "
                             "retry after 1s")

    def answered_by(self, outcome: Outcome) -> None:
        self.trailers.update({k.lower(): v for k, v in outcome.headers().items()})


Handler = Callable[[Any, Rpc], Awaitable[Any]]
StreamHandler = Callable[[AsyncIterator[Any], Rpc], AsyncIterator[Any]]


class RpcServer:
    def __init__(self, serving: Serving, settings: Settings, *, reuse_port: bool) -> None:
        self.serving, self.settings = serving, settings
        self.metrics = serving.metrics
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", settings.max_upload_bytes),
            ("grpc.max_send_message_length", -1),
            # several server processes share the port (IMGSERVE_WORKERS); alone, a port in use is an error
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ])
        self.health = health.aio.HealthServicer()
        self._watcher: asyncio.Task[None] | None = None

    def add(self, service: str, handlers: dict[str, Handler | StreamHandler], auth: dict[str, str]) -> None:
        """`handlers` by method name; `auth` names the methods that need a key ("predict" or "admin")."""
        spec = protos.methods(service)
        rpc_handlers = {}
        for name, fn in handlers.items():
            req_cls, resp_cls, client_stream, server_stream = spec[name]
            if client_stream and server_stream:
                rpc_handlers[name] = grpc.stream_stream_rpc_method_handler(
                    self._stream(service, name, fn, req_cls, auth.get(name)),  # type: ignore[arg-type]
                    response_serializer=resp_cls.SerializeToString)
            else:
                rpc_handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(service, name, fn, req_cls, auth.get(name)),  # type: ignore[arg-type]
                    response_serializer=resp_cls.SerializeToString)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, rpc_handlers),))

    def _check(self, context: grpc.aio.ServicerContext[Any, Any], metadata: dict[str, str], scope: str | None) -> None:
        if scope is None:
            return
        expected = self.settings.admin_api_key if scope == "admin" else self.settings.api_key
        if expected is not None and not key_matches(metadata, expected.get_secret_value()):
            raise Unauthorized(f"this method needs the {'admin API' if scope == 'admin' else 'API'} key: send "
                               "metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'")
        if scope == "predict" and getattr(self.serving, "draining", False):
            self.metrics.rejections.labels("draining").inc()
            raise NotReady("the server is draining for shutdown; retry on another instance")

    def _rpc(self, context: grpc.aio.ServicerContext[Any, Any]) -> Rpc:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        rpc = Rpc(self.serving, context, metadata)
        rpc.trailers["x-request-id"] = request_id(metadata.get("x-request-id"))
        return rpc

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], rpc: Rpc, exc: ServiceError) -> None:
        code = CODES.get(exc.status_code, grpc.StatusCode.INTERNAL)
        if code == grpc.StatusCode.INTERNAL:
            logger.error("gRPC call failed: %s", exc.message)
        await context.abort(code, exc.message, trailing_metadata=tuple(rpc.trailers.items()))

    def _unary(self, service: str, method: str, fn: Handler, req_cls: Any, scope: str | None) -> Any:
        short = service.rsplit(".", 1)[-1]

        async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            t0, code = time.perf_counter(), grpc.StatusCode.OK
            rpc = self._rpc(context)
            work = scope is not None  # inference and repository calls, as HTTP POSTs; reads (metadata) are not
            if work:
                self.metrics.request_began()
            try:
                try:
                    self._check(context, rpc.metadata, scope)
                    if work:
                        rpc.admit()
                    try:
                        request = req_cls.FromString(raw)
                    except DecodeError as exc:
                        raise BadRequest(f"the message is not a valid {req_cls.DESCRIPTOR.name}: {exc}") from exc
                    response = await fn(request, rpc)
                except ServiceError as exc:
                    code = CODES.get(exc.status_code, grpc.StatusCode.INTERNAL)
                    await self._fail(context, rpc, exc)
                context.set_trailing_metadata(tuple(rpc.trailers.items()))
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                self.metrics.rejections.labels("client_gone").inc()
                raise
            except Exception as exc:
                if code == grpc.StatusCode.OK and not isinstance(exc, grpc.aio.AbortError):
                    code = grpc.StatusCode.INTERNAL
                    logger.exception("gRPC %s/%s failed", service, method)
                raise
            finally:
                if work:
                    self.metrics.request_ended()
                self.metrics.grpc_requests.labels(short, method, code.name).inc()
                self.metrics.grpc_latency.labels(method).observe(time.perf_counter() - t0)
                self.metrics.process_requests.inc()

        return handle

    def _stream(self, service: str, method: str, fn: StreamHandler, req_cls: Any, scope: str | None) -> Any:
        short = service.rsplit(".", 1)[-1]

        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
                         ) -> AsyncIterator[Any]:
            code = grpc.StatusCode.OK
            rpc = self._rpc(context)
            try:
                try:
                    self._check(context, rpc.metadata, scope)
                except ServiceError as exc:
                    code = CODES.get(exc.status_code, grpc.StatusCode.INTERNAL)
                    await self._fail(context, rpc, exc)

                async def parsed() -> AsyncIterator[Any]:
                    """Each message, or the BadRequest that says why it is not one (the stream goes on)."""
                    async for raw in requests:
                        try:
                            yield req_cls.FromString(raw)
                        except DecodeError as exc:
                            yield BadRequest(f"the message is not a valid {req_cls.DESCRIPTOR.name}: {exc}")

                async for response in fn(parsed(), rpc):
                    yield response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                self.metrics.grpc_requests.labels(short, method, code.name).inc()

        return handle

    async def start(self, host: str, port: int) -> int:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        bound: int = self.server.add_insecure_port(f"{host}:{port}")
        await self.server.start()
        await self._set_health()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="grpc-health")
        logger.info("gRPC on %s:%d (KServe v2 / Triton, TF Serving, health)", host, bound)
        return bound

    async def _set_health(self) -> bool:
        serving = not_ready(self.serving) is None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)
        return serving

    async def _watch(self) -> None:
        """Health follows readiness: NOT_SERVING while starting, draining or another process is not ready."""
        last = None
        while True:
            now = not_ready(self.serving) is None
            if now != last:
                await self._set_health()
                last = now
            await asyncio.sleep(0.05)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, refuse new calls, and give the ones in flight up to `grace_s` to finish."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
