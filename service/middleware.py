"""One pure-ASGI middleware: request IDs, refusing new work while draining, and the body size limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, RequestTimeout

EXEMPT_PREFIXES = ("/health", "/metrics", "/v2/health")


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout_s: float, draining: Callable[[], bool],
                 on_reject: Callable[[str], Any]) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.draining = draining
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw_id = headers.get(b"x-request-id", b"")
        request_id = raw_id.decode("latin-1")[:128] if raw_id else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        path: str = scope["path"]
        if self.draining() and not path.startswith(EXEMPT_PREFIXES):
            self.on_reject("draining")
            await _json(send_with_id, 503, "the server is shutting down; retry on another instance",
                        "draining", {"retry-after": "1", "connection": "close"})
            return
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
        body_deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, body_deadline - time.monotonic()))
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


async def _json(send: Send, status: int, message: str, code: str, extra: dict[str, str]) -> None:
    body = orjson.dumps({"error": message, "code": code})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
