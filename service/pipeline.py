"""The one request pipeline every protocol goes through.

    Call -> resolve + acquire the version -> (batcher.incoming: parse, limits, decode) -> run_rows

A protocol module (service/api for HTTP, service/rpc for gRPC) turns its request into a `Call` (the
deadline, the routing key, how to tell that the caller left), supplies a parser ("this body into
images") and renders the `Outcome`. Nothing here knows Starlette or gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import os
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

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
from service.imaging import ImageError, ImageInfo, ImageTooLarge, UnsupportedImageFormat, decode_image, probe
from service.loading import ServedVersion
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.registry import Registry

TIMEOUT_HEADER = "x-request-timeout-ms"  # the deadline over HTTP and in gRPC metadata (gRPC's own deadline first)
ROUTE_KEY_HEADER = "x-route-key"
REQUEST_ID_MAX = 128  # characters of a caller's own X-Request-ID kept
_ID_PREFIX = os.urandom(6).hex()  # request IDs: 32 hex digits, random per process, then a counter (no syscall)
_ID_COUNTER = itertools.count()


def request_id(given: str | None) -> str:
    """The request's ID: the caller's X-Request-ID (HTTP header or gRPC metadata), cut to REQUEST_ID_MAX
    characters, else a new one. Every protocol answers with it, logs it, and the recent images keep it."""
    return given[:REQUEST_ID_MAX] if given else f"{_ID_PREFIX}{next(_ID_COUNTER):020x}"


_SHADOW_TASKS: set[asyncio.Task[None]] = set()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class Images:
    """What a protocol parsed from its body: encoded images to decode, or pixel rows already checked."""

    blobs: list[bytes] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blobs) + len(self.pixels)


Parser = Callable[[ServedVersion], Awaitable[Images]]


class Serving(Protocol):
    """What the lifespan set up (the app's state): every protocol serves from the same one."""

    settings: Settings
    metrics: Metrics
    decode_pool: Executor


@dataclass
class Call:
    """One inference call, whichever protocol brought it."""

    serving: Serving
    deadline: float  # on the monotonic clock
    protocol: str  # "http" or "grpc"
    route_key: str | None = None  # keeps one caller on one side of a canary split
    gone: Callable[[], Awaitable[None]] | None = None  # resolves if the caller leaves before its answer
    request_id: str | None = None  # X-Request-ID: the request log, and feedback naming a recent prediction


@dataclass
class Outcome:
    """The rows' probabilities, who computed them, and how (for the headers)."""

    probabilities: np.ndarray
    queue_s: float
    run_s: float
    batch_size: int
    served: ServedVersion
    names: list[str] = field(default_factory=list)
    role: str = "stable"
    blobs: list[bytes] = field(default_factory=list)  # the encoded images, when the protocol sent them so

    def headers(self) -> dict[str, str]:
        rt = self.served.runtime
        return {
            "X-Model-Name": self.served.name,
            "X-Model-Version": str(self.served.version),
            "X-Model-Runtime": f"{rt.runtime}/{rt.precision}",
            "X-Model-Role": self.role,
            "Server-Timing": f"queue;dur={self.queue_s * 1e3:.2f}, inference;dur={self.run_s * 1e3:.2f}, "
            f'batch;desc="{self.batch_size}"',
        }


def not_ready(state: object) -> str | None:
    """Why the service cannot answer predictions now (starting, draining, another process not ready), or None."""
    if getattr(state, "draining", False):
        return "draining for shutdown"
    registry: Registry | None = getattr(state, "registry", None)
    if registry is None:
        return "no model is loaded yet"
    if not registry.ready:
        return registry.waiting_for()
    board = getattr(state, "board", None)
    return board.others_not_ready() if board is not None else None


async def infer(call: Call, model: str | None, version: int | None, parse: Parser,
                label: str | None = None) -> Outcome:
    """Run one request's images through the version that serves `model` (the `version` or `label` it names,
    else stable or canary, see Registry.route), and copy it to a shadow version when one is configured."""
    state = call.serving
    registry = getattr(state, "registry", None)
    if registry is None:
        raise NotReady("the service is starting")
    served, role = registry.route(model, version, label, call.route_key)
    labels = (served.name, str(served.version), role)
    t0 = time.perf_counter()
    try:
        outcome = await _infer_on(call, registry, served, role, parse)
    except ServiceError as exc:
        state.metrics.version_requests.labels(*labels, "server_error" if exc.status_code >= 500 else
                                              "client_error").inc()
        raise
    seconds = time.perf_counter() - t0
    state.metrics.version_requests.labels(*labels, "ok").inc()
    state.metrics.version_latency.labels(*labels).observe(seconds)
    if served.quality is not None:
        served.quality.observe(outcome.probabilities)
    _record(call, outcome, seconds)
    return outcome


def _record(call: Call, outcome: Outcome, seconds: float) -> None:
    """The request log's line and the recent-images buffer, each when the operator turned it on."""
    recent, log = getattr(call.serving, "recent", None), getattr(call.serving, "request_log", None)
    if recent is None and log is None:
        return
    served = outcome.served
    tops = top_k(outcome.probabilities, served.meta.labels, 3)
    if recent is not None and call.request_id and outcome.blobs:
        recent.put(call.request_id, served.name, served.version, [str(t[0]["label"]) for t in tops], outcome.blobs)
    if log is not None:
        log.write({"time": round(time.time(), 3), "request_id": call.request_id, "protocol": call.protocol,
                   "model": served.name, "version": served.version, "role": outcome.role,
                   "latency_ms": round(seconds * 1e3, 3), "images": len(tops),
                   "top": [[{"label": e["label"], "score": round(e["score"], 6)} for e in t] for t in tops]},  # type: ignore[call-overload]
                  outcome.blobs)


async def _infer_on(call: Call, registry: Registry, served: ServedVersion, role: str, parse: Parser) -> Outcome:
    state, settings = call.serving, call.serving.settings
    if served.batcher.depth >= served.batcher.max_queue_rows:  # no row fits: refuse before reading the body
        raise _overloaded(served, state.metrics, f"the queue holds {served.batcher.depth} rows")
    with served.acquire():
        with served.batcher.incoming():  # rows on their way: the batcher may wait for them
            images = await parse(served)
            check_count(len(images), settings)
            if served.batcher.depth + len(images) > served.batcher.max_queue_rows:  # filled while the body came
                raise _overloaded(served, state.metrics, f"the queue holds {served.batcher.depth} of "
                                  f"{served.batcher.max_queue_rows} rows; {len(images)} more do not fit")
            h, w = served.meta.input.height, served.meta.input.width
            rows = images.pixels or await decode_all(images.blobs, h, w, settings, state.decode_pool, state.metrics)
        outcome = await run_rows(call, served, rows)
    outcome.names, outcome.role, outcome.blobs = images.names, role, images.blobs
    shadow = registry.shadow(served.name)
    if shadow is not None and shadow[0] is not served:
        stats = registry.shadow_stats.setdefault((served.name, shadow[0].version, served.version),
                                                 defaultdict(float))
        _maybe_shadow(shadow[0], shadow[1], served, rows, outcome.probabilities, settings, state.metrics, stats)
    return outcome


def _maybe_shadow(shadow: ServedVersion, percent: float, served: ServedVersion, rows: Sequence[np.ndarray],
                  answer: np.ndarray, settings: Settings, metrics: Metrics, stats: defaultdict[str, float]) -> None:
    """Copy a share of the requests to the shadow version, only on idle capacity: when the answering version
    has nothing queued and no other batch running (its own batch has just ended) and the shadow has less
    than a batch queued; otherwise the copy is dropped (and counted). The caller's answer is already made
    and never waits for, or changes with, the shadow."""
    if random.random() >= percent / 100:
        return
    labels = (shadow.name, str(shadow.version), str(served.version))
    if shadow.meta.input != served.meta.input or shadow.meta.labels != served.meta.labels:
        metrics.shadow_requests.labels(*labels, "incompatible").inc()
        stats["incompatible"] += 1
        return
    busy = served.batcher.depth or served.batcher.running_rows
    if busy or shadow.batcher.depth + len(rows) > shadow.batcher.max_batch_size or not shadow.batcher.accepting:
        metrics.shadow_requests.labels(*labels, "dropped").inc()
        stats["dropped"] += 1
        return
    task = asyncio.get_running_loop().create_task(_shadow(shadow, labels, list(rows), answer, settings, metrics,
                                                          stats))
    _SHADOW_TASKS.add(task)
    task.add_done_callback(_SHADOW_TASKS.discard)


async def _shadow(shadow: ServedVersion, labels: tuple[str, str, str], rows: list[np.ndarray], answer: np.ndarray,
                  settings: Settings, metrics: Metrics, stats: defaultdict[str, float]) -> None:
    t = time.perf_counter()
    try:
        with shadow.acquire():
            futures = shadow.batcher.submit(rows, time.monotonic() + settings.request_timeout_ms / 1000)
            results = await asyncio.gather(*futures)
    except Exception:  # a shadow that fails, is full or stops: counted, never the caller's concern
        metrics.shadow_requests.labels(*labels, "failed").inc()
        stats["failed"] += 1
        return
    got = np.stack([r.value for r in results])
    metrics.shadow_seconds.labels(*labels).observe(time.perf_counter() - t)
    metrics.shadow_requests.labels(*labels, "compared").inc()
    metrics.shadow_rows.labels(*labels).inc(len(rows))
    metrics.shadow_agreement.labels(*labels).inc(int((got.argmax(1) == answer.argmax(1)).sum()))
    metrics.shadow_top_prob_change.labels(*labels).inc(float((got.max(1) - answer.max(1)).sum()))
    stats["compared"] += 1
    stats["rows"] += len(rows)
    stats["agreements"] += int((got.argmax(1) == answer.argmax(1)).sum())
    stats["top_probability_change"] += float((got.max(1) - answer.max(1)).sum())
    stats["seconds"] += time.perf_counter() - t


def deadline_for(raw: str | None, settings: Settings) -> float:
    """The request's deadline on the monotonic clock: the setting, or `raw` (the X-Request-Timeout-Ms header's
    value) when the request sends one."""
    timeout_ms = settings.request_timeout_ms
    if raw is not None:
        try:
            timeout_ms = int(raw)
        except ValueError as exc:
            raise BadRequest(f"{TIMEOUT_HEADER} must be a whole number of milliseconds, got {raw!r}") from exc
        if not 1 <= timeout_ms <= settings.max_request_timeout_ms:
            raise BadRequest(f"{TIMEOUT_HEADER} must be between 1 and {settings.max_request_timeout_ms}")
    return time.monotonic() + timeout_ms / 1000.0


def check_count(n: int, settings: Settings) -> None:
    if n == 0:
        raise BadRequest("the request holds no image")
    if n > settings.max_images_per_request:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {settings.max_images_per_request}")


def b64_image(item: Any, what: str) -> bytes:
    """One base64-encoded image of a JSON body."""
    if not isinstance(item, str):
        raise BadRequest(f"{what} must be a base64 string")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{what} is not valid base64 ({exc})") from exc


def pixel_rows(values: Any, height: int, width: int, shape: Sequence[int] | None = None) -> list[np.ndarray]:
    """Pixel arrays sent as JSON numbers (nested, or flat with a `shape`): checked, as uint8 rows."""
    try:
        arr = np.asarray(values)
        if shape is not None:
            arr = arr.reshape(shape)
    except (ValueError, TypeError) as exc:
        what = f"{int(np.prod(shape))} integers of shape {list(shape)}" if shape is not None else "one array"
        raise BadRequest(f"the pixel values do not form {what} (ragged, or not numbers): {exc}") from exc
    if arr.ndim != 4 or arr.shape[1:] != (height, width, 3):
        raise BadRequest(f"pixel arrays must have shape [{height}, {width}, 3] per image; got {list(arr.shape[1:])}")
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0)):
        raise BadRequest("pixel values must be integers from 0 to 255 (uint8 input)")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise BadRequest("pixel values must be between 0 and 255 (uint8 input)")
    return list(arr.astype(np.uint8))


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
    """Decode every image; the first bad one fails the request with its 4xx.

    The header is read first, on the event loop (tens of microseconds). A lone image of at most
    `inline_decode_max_pixels` is then decoded right there: about a millisecond, less than the thread
    hand-off and GIL traffic would cost with one core per process. Larger or several images go to
    the thread pool, so that the event loop is never held for long."""
    infos = []
    for i, b in enumerate(blobs):
        try:
            infos.append(probe(b, settings.max_image_pixels))
            if len(blobs) == 1 and infos[0].width * infos[0].height <= settings.inline_decode_max_pixels:
                return [_timed_decode(b, height, width, settings, infos[0], metrics)]
        except ImageError as exc:
            raise _rejected(exc, metrics, i, len(blobs)) from exc
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(loop.run_in_executor(pool, _timed_decode, b, height, width, settings, info,
                                                          metrics) for b, info in zip(blobs, infos, strict=True)),
                                   return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, ImageError):
            raise _rejected(r, metrics, i, len(blobs))
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


def _timed_decode(data: bytes, height: int, width: int, settings: Settings, info: ImageInfo,
                  metrics: Metrics) -> np.ndarray:
    t = time.perf_counter()
    arr = decode_image(data, height, width, settings.max_image_pixels, info)
    metrics.decode_seconds.observe(time.perf_counter() - t)
    return arr


def _rejected(exc: ImageError, metrics: Metrics, index: int, count: int) -> ServiceError:
    metrics.rejections.labels(exc.code).inc()
    return _as_service_error(exc, index, count)


def _submit(served: ServedVersion, rows: Sequence[np.ndarray], deadline: float,
            metrics: Metrics) -> list[asyncio.Future[RowResult[np.ndarray]]]:
    _check_deadline(deadline, metrics)
    try:
        return served.batcher.submit(rows, deadline)
    except QueueFull as exc:
        raise _overloaded(served, metrics, str(exc)) from exc
    except BatcherStopped as exc:
        metrics.rejections.labels("draining").inc()
        raise NotReady("this model version is being unloaded; retry") from exc


def _check_deadline(deadline: float, metrics: Metrics) -> None:
    if time.monotonic() >= deadline:  # spent reading and decoding: queueing it would only waste compute
        metrics.rejections.labels("deadline").inc()
        raise DeadlineExpired("the request's deadline passed before its images could be queued; "
                              f"raise {TIMEOUT_HEADER} or retry later")


def _overloaded(served: ServedVersion, metrics: Metrics, detail: str) -> Overloaded:
    metrics.rejections.labels("queue_full").inc()
    retry = max(1, round(served.batcher.max_queue_rows / max(served.batcher.max_batch_size, 1) * 0.05))
    return Overloaded(f"the server is at capacity ({detail}); retry after {retry}s",
                      headers={"Retry-After": str(retry)})


async def _await_rows(gone: Callable[[], Awaitable[None]] | None, futures: list[asyncio.Future[RowResult[np.ndarray]]],
                      metrics: Metrics) -> list[RowResult[np.ndarray]]:
    gathered = asyncio.gather(*futures)
    watcher = asyncio.ensure_future(gone()) if gone is not None else None
    try:
        waiting: set[asyncio.Future[Any]] = {gathered} | ({watcher} if watcher is not None else set())
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            for f in futures:
                f.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gathered
            raise ClientGone()
        try:
            return gathered.result()
        except DeadlineExceeded as exc:
            metrics.rejections.labels("deadline").inc()
            raise DeadlineExpired("the request's deadline passed before its images were run; "
                                  f"raise {TIMEOUT_HEADER} or retry later") from exc
        except BatchFailed as exc:
            raise ModelFailed(f"the model failed on this input: {exc}") from exc
    finally:
        if watcher is not None:
            watcher.cancel()
        for f in futures:
            if not f.done():
                f.cancel()


async def run_rows(call: Call, served: ServedVersion, rows: Sequence[np.ndarray]) -> Outcome:
    """Queue the rows on the version's batcher and wait for all of them (or the client leaving).
    A lone row that finds the batcher idle, with a cheap model, runs at once (`Batcher.run_inline`)."""
    deadline, metrics = call.deadline, call.serving.metrics
    if len(rows) == 1 and served.batcher.may_run_inline():
        # A lone row runs inline only while no other request is being worked on in this process. Under
        # load, the event loop reads several requests in one poll: yield once so that they begin (HTTP
        # and gRPC count themselves first thing), and batch with them. Otherwise each would run inline in
        # turn, finding the model idle, and the process would answer one request at a time on one core.
        await asyncio.sleep(0)
        _check_deadline(deadline, metrics)
        if metrics.requests_in_progress <= 1:
            try:
                result = served.batcher.run_inline(rows[0])
            except BatchFailed as exc:
                raise ModelFailed(f"the model failed on this input: {exc}") from exc
            if result is not None:
                return Outcome(probabilities=result.value[None], queue_s=0.0, run_s=result.run_s, batch_size=1,
                               served=served)
    futures = _submit(served, rows, deadline, metrics)
    inflight = metrics.inflight_rows.labels(served.name, str(served.version))
    inflight.inc(len(rows))
    try:
        results = await _await_rows(call.gone, futures, metrics)
    finally:
        inflight.dec(len(rows))
    return Outcome(
        probabilities=np.stack([r.value for r in results]),
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
