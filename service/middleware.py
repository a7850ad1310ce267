"""One pure-ASGI middleware, outermost: request IDs, HTTP metrics, refusing work while draining or over
the in-flight limit (before the body is read, so that refusing stays cheap under overload), and the
body size and time limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, RequestTimeout
from service.metrics import Metrics
from service.pipeline import request_id as request_id_of

EXEMPT_PREFIXES = ("/health", "/metrics", "/v2/health")
UNTIMED = frozenset({"/metrics"})
_ROUTES_SEEN: dict[tuple[str, str], str] = {}  # (method, path) -> route, for requests refused before routing


def _route_of(scope: Scope) -> str:
    """The route template that served (or would serve) the request, e.g. `/v2/models/{model}/infer`."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "none"))
    key = (scope["method"], scope["path"])
    found = _ROUTES_SEEN.get(key)
    if found is None:
        found = _match(getattr(scope.get("app"), "routes", ()), scope) or "none"
        if len(_ROUTES_SEEN) < 1024:  # paths come from clients: keep the memo bounded
            _ROUTES_SEEN[key] = found
    return found


def _match(routes: Iterable[Any], scope: Scope) -> str | None:
    """For a request the router never saw (refused here): the route it would have reached."""
    for candidate in routes:
        if candidate.matches(scope)[0] != Match.FULL:
            continue
        inner = getattr(candidate, "original_router", None)  # FastAPI's included routers
        if inner is None:
            return getattr(candidate, "path", None)
        found = _match(inner.routes, scope)
        if found:
            return found
    return None


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout_s: float, draining: Callable[[], bool],
                 metrics: Metrics, inflight_limit: int) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.draining = draining
        self.metrics = metrics
        self.inflight_limit = inflight_limit  # requests of every protocol (gRPC calls too) in this process
        # the answer over the limit, made once: refusing must stay cheap when it is most of the traffic
        self._busy_body, self._busy_headers = _json_parts(
            f"the server is at capacity ({inflight_limit} requests in progress in this process); retry after 1s",
            "queue_full", {"retry-after": "1"})

    def on_reject(self, reason: str) -> None:
        self.metrics.rejections.labels(reason).inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        raw_id = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = request_id_of(raw_id.decode("latin-1"))
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        admitted = False
        try:
            if scope["method"] == "POST":  # the work: predictions, loads
                if self.metrics.requests_in_progress >= self.inflight_limit and not self.draining():
                    self.on_reject("busy")
                    status = 429
                    await send({"type": "http.response.start", "status": 429,
                                "headers": [*self._busy_headers, id_header]})
                    await send({"type": "http.response.body", "body": self._busy_body})
                    return
                admitted = True
                self.metrics.request_began()
            await self._guarded(scope, receive, send_with_id)
        finally:
            if admitted:
                self.metrics.request_ended()
            handler = _route_of(scope)
            if handler not in UNTIMED:
                self.metrics.observe_http(handler, scope["method"], status, time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send_with_id: Send) -> None:
        path: str = scope["path"]
        if self.draining() and not path.startswith(EXEMPT_PREFIXES):
            self.on_reject("draining")
            await _json(send_with_id, 503, "the server is shutting down; retry on another instance",
                        "draining", {"retry-after": "1", "connection": "close"})
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_body_bytes:
                self.on_reject("body_too_large")
                await _json(send_with_id, 413, f"the request body is {declared} bytes; the limit is "
                            f"{self.max_body_bytes} bytes (IMGSERVE_MAX_UPLOAD_BYTES)", "payload_too_large",
                            {"connection": "close"})
                return
        received = 0
        body_done = False
        body_deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no time limit
                return await receive()
            try:  # asyncio.timeout, not wait_for: no task per body message
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                self.on_reject("body_timeout")
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s "
                                     "(IMGSERVE_BODY_TIMEOUT_S)", headers={"connection": "close"}) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    self.on_reject("body_too_large")
                    raise PayloadTooLarge(f"the request body is over the limit of {self.max_body_bytes} bytes "
                                          "(IMGSERVE_MAX_UPLOAD_BYTES)")
            return message

        await self.app(scope, limited_receive, send_with_id)


def _json_parts(message: str, code: str, extra: dict[str, str]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = orjson.dumps({"error": message, "code": code})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return body, headers + [(k.encode(), v.encode()) for k, v in extra.items()]


async def _json(send: Send, status: int, message: str, code: str, extra: dict[str, str]) -> None:
    body, headers = _json_parts(message, code, extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
