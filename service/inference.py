"""What every API does with images: decode off the event loop, queue the rows, await the answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request

from service.batcher import BatcherStopped, BatchFailed, DeadlineExceeded, QueueFull, RowResult
from service.errors import (
    BadRequest,
    DeadlineExpired,
    ModelFailed,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.imaging import ImageError, ImageTooLarge, UnsupportedImageFormat, decode_image
from service.metrics import Metrics
from service.registry import ServedVersion
from service.settings import Settings

TIMEOUT_HEADER = "x-request-timeout-ms"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class Outcome:
    """The rows' probabilities and how they were made (for Server-Timing)."""

    probabilities: np.ndarray
    queue_s: float
    run_s: float
    batch_size: int
    served: ServedVersion

    def headers(self) -> dict[str, str]:
        return {
            "X-Model-Name": self.served.name,
            "X-Model-Version": str(self.served.version),
            "Server-Timing": f"queue;dur={self.queue_s * 1e3:.2f}, inference;dur={self.run_s * 1e3:.2f}, "
            f'batch;desc="{self.batch_size}"',
        }


def deadline_for(request: Request, settings: Settings) -> float:
    """The request's deadline on the monotonic clock: the setting, or the X-Request-Timeout-Ms header."""
    raw = request.headers.get(TIMEOUT_HEADER)
    timeout_ms = settings.request_timeout_ms
    if raw is not None:
        try:
            timeout_ms = int(raw)
        except ValueError as exc:
            raise BadRequest(f"{TIMEOUT_HEADER} must be a whole number of milliseconds, got {raw!r}") from exc
        if not 1 <= timeout_ms <= settings.max_request_timeout_ms:
            raise BadRequest(f"{TIMEOUT_HEADER} must be between 1 and {settings.max_request_timeout_ms}")
    return time.monotonic() + timeout_ms / 1000.0


def _as_service_error(exc: ImageError, index: int, count: int) -> ServiceError:
    where = f"image {index + 1} of {count}: " if count > 1 else ""
    if isinstance(exc, UnsupportedImageFormat):
        return UnsupportedMediaType(where + str(exc))
    if isinstance(exc, ImageTooLarge):
        return PayloadTooLarge(where + str(exc))
    return BadRequest(where + str(exc))


async def decode_all(
    blobs: Sequence[bytes], height: int, width: int, settings: Settings, pool: Executor, metrics: Metrics
) -> list[np.ndarray]:
    """Decode every image in the thread pool; the first bad one fails the request with its 4xx."""
    if not blobs:
        raise BadRequest("the request holds no image")
    if len(blobs) > settings.max_images_per_request:
        raise PayloadTooLarge(f"{len(blobs)} images in one request; the limit is {settings.max_images_per_request}")
    loop = asyncio.get_running_loop()

    def one(data: bytes) -> np.ndarray:
        t = time.perf_counter()
        arr = decode_image(data, height, width, settings.max_image_pixels)
        metrics.decode_seconds.observe(time.perf_counter() - t)
        return arr

    results = await asyncio.gather(*(loop.run_in_executor(pool, one, b) for b in blobs), return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, ImageError):
            metrics.rejections.labels(r.code).inc()
            raise _as_service_error(r, i, len(blobs))
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_rows(
    request: Request | None, served: ServedVersion, rows: Sequence[np.ndarray], deadline: float, metrics: Metrics
) -> Outcome:
    """Queue the rows on the version's batcher and wait for all of them (or the client leaving)."""
    if time.monotonic() >= deadline:  # spent reading and decoding: queueing it would only waste compute
        metrics.rejections.labels("deadline").inc()
        raise DeadlineExpired("the request's deadline passed before its images could be queued; "
                              f"raise {TIMEOUT_HEADER} or retry later")
    try:
        futures = served.batcher.submit(rows, deadline)
    except QueueFull as exc:
        metrics.rejections.labels("queue_full").inc()
        retry = max(1, round(served.batcher.max_queue_rows / max(served.batcher.max_batch_size, 1) * 0.05))
        raise Overloaded(f"the server is at capacity ({exc}); retry after {retry}s",
                         headers={"Retry-After": str(retry)}) from exc
    except BatcherStopped as exc:
        metrics.rejections.labels("draining").inc()
        raise NotReady("this model version is being unloaded; retry") from exc
    inflight = metrics.inflight_rows.labels(served.name, str(served.version))
    inflight.inc(len(rows))
    gathered = asyncio.gather(*futures)
    watcher = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    try:
        waiting: set[asyncio.Future[object]] = {gathered}
        if watcher is not None:
            waiting.add(watcher)
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            for f in futures:
                f.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gathered
            raise ClientGone()
        try:
            results: list[RowResult[np.ndarray]] = gathered.result()
        except DeadlineExceeded as exc:
            metrics.rejections.labels("deadline").inc()
            raise DeadlineExpired("the request's deadline passed before its images were run; "
                                  f"raise {TIMEOUT_HEADER} or retry later") from exc
        except BatchFailed as exc:
            raise ModelFailed(f"the model failed on this input: {exc}") from exc
    finally:
        inflight.dec(len(rows))
        if watcher is not None:
            watcher.cancel()
        for f in futures:
            if not f.done():
                f.cancel()
    probs = np.stack([r.value for r in results])
    return Outcome(
        probabilities=probs,
        queue_s=max(r.queue_s for r in results),
        run_s=max(r.run_s for r in results),
        batch_size=max(r.batch_size for r in results),
        served=served,
    )


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[list[dict[str, object]]]:
    """Per row, the k best classes as {label, index, score}, best first."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"label": labels[i], "index": int(i), "score": float(row[i])} for i in idx]
        for row, idx in zip(probs, order, strict=True)
    ]
