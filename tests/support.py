"""What the tests share, in one place: the app driven in process through its lifespan (`app_client`), a
real server process (`start_server`), waiting on a condition instead of sleeping (`wait_until`,
`eventually`), a clock the test moves (`FakeClock`), closed-loop load (`Load`), the fake runtimes
(bench/fakes.py, shared with the in-process benchmark), and the real data and models the tests use."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np

from bench.fakes import ConstantModel, FakeClassifier, publish_fake
from bench.harness import REPO, SHARED, ServerProcess, free_port, metric_sum

__all__ = ["REPO", "SHARED", "ConstantModel", "FakeClassifier", "ServerProcess", "free_port", "metric_sum"]

CLOTHING = SHARED / "datasets" / "clothing-small"
LABELS = ["dark", "mid", "bright"]  # FakeClassifier's classes, by the red value of the image
LiveServer = ServerProcess
T = TypeVar("T")


# -- waiting on conditions -------------------------------------------------------------------------------

def wait_until(condition: Callable[[], object], timeout: float = 60, what: str = "the condition",
               every: float = 0.05, ignoring: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll `condition` until it returns something truthy, and return that; fail naming `what` after
    `timeout` seconds (exceptions of the `ignoring` types count as not yet). The timeout only bounds a
    test that would otherwise hang: nothing passes or fails on how long the condition took."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = condition()
        except ignoring:
            got = None
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(every)


async def eventually(condition: Callable[[], object], timeout: float = 10, what: str = "the condition") -> Any:
    """`wait_until` for a test running on the event loop: yields to the loop between polls."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.002)


async def eventually_async(call: Callable[[], Awaitable[T]], good: Callable[[T], object], timeout: float = 30,
                           what: str = "the awaited condition") -> T:
    """Await `call()` until `good(result)` holds, and return that result (for conditions read over ASGI)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await call()
        if good(got):
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s; last: {got!r}")
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every task that can run on the event loop run."""
    for _ in range(20):
        await asyncio.sleep(0)


class FakeClock:
    """Time moves only when the test says so (the batcher's `clock`)."""

    def __init__(self) -> None:
        self.t = 0.0
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.t + timeout, fut))
        ev = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({ev, fut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ev.cancel()
            if not fut.done():
                fut.cancel()

    async def advance(self, dt: float) -> None:
        self.t += dt
        for deadline, fut in list(self._waiters):
            if deadline <= self.t and not fut.done():
                fut.set_result(None)
        self._waiters = [(d, f) for d, f in self._waiters if not f.done()]
        await settle()


# -- the app in process ----------------------------------------------------------------------------------

def jpeg(red: int, size: int = 40) -> bytes:
    """A JPEG of one colour, whose red value FakeClassifier reads as its class."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 2] = red  # BGR: red channel
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    return buf.tobytes()


def write_fake_version(store: Path, name: str, version: int, labels: list[str], size: int = 16,
                       **meta: object) -> Path:
    final = publish_fake(store, name, labels, size, **meta)
    assert final.name == str(version)
    return final


async def wait_ready(client: httpx.AsyncClient, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get("/health/ready")).status_code != 200:
        if time.monotonic() >= deadline:
            raise AssertionError(f"the app was not ready within {timeout} s")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def app_client(store: Path, *, loader: Callable[[Path, Any], Any] | None = None, ready: bool = True,
                     **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app on `store` through its lifespan, with FakeClassifier as the runtime unless `loader` says
    otherwise, and an httpx client talking ASGI to it (no socket); waits for readiness unless `ready` is
    False. `client.app` is the app, for tests that look at its state."""
    from asgi_lifespan import LifespanManager

    from service.app import create_app
    from service.settings import Settings

    settings.setdefault("poll_interval_s", 0.05)
    app = create_app(Settings(**{"model_store": store, **settings}), loader=loader or (lambda p, m: FakeClassifier(m)))
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://test") as c:
            c.app = app  # type: ignore[attr-defined]
            if ready:
                await wait_ready(c)
            yield c


# -- real data and real models ---------------------------------------------------------------------------

def clothing_images(n: int, split: str = "validation") -> list[Path]:
    """n real JPEGs, spread over the classes."""
    classes = sorted(p for p in (CLOTHING / split).iterdir() if p.is_dir())
    out: list[Path] = []
    i = 0
    while len(out) < n:
        files = sorted((classes[i % len(classes)]).glob("*.jpg"))
        out.append(files[(i // len(classes)) % len(files)])
        i += 1
    return out


@dataclass
class Trained:
    store: Path
    name: str
    version: int
    height: int
    width: int
    labels: list[str]
    test_paths: list[Path] = field(default_factory=list)  # the version's test split, as train read it

    def test_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The test split's images (the service's decoder) and true class indices (from their folders)."""
        from service.imaging import load_image

        images = np.stack([load_image(p, self.height, self.width) for p in self.test_paths])
        return images, np.array([self.labels.index(p.parent.name) for p in self.test_paths])


def clone_version(store: Path, name: str, src: int, dst: int, mutate: dict[str, object] | None = None,
                  edit: Callable[[Path], object] | None = None) -> Path:
    """Publish a copy of version `src` as `dst` the way train does: a hidden folder renamed into place.
    `edit` changes the copy's files before it is renamed, so a server never sees the copy half edited
    (its scans would try the copy, then the edit as a new version of the files)."""
    tmp = store / name / f".tmp-clone-{dst}"
    shutil.copytree(store / name / str(src), tmp)
    meta = json.loads((tmp / "model.json").read_text())
    meta.update({"version": dst, **(mutate or {})})
    (tmp / "model.json").write_text(json.dumps(meta))
    if edit is not None:
        edit(tmp)
    final = store / name / str(dst)
    tmp.rename(final)
    return final


def served_runtime(trained: Trained, **settings: object) -> Any:
    """In process, the runtime a server with these settings picks for the trained version (a variant or
    the SavedModel): what its answers must equal."""
    from service import runtimes, store
    from service.settings import Settings

    path = trained.store / trained.name / str(trained.version)
    return runtimes.load(path, store.read_metadata(path), Settings(**settings))  # type: ignore[arg-type]


# -- real servers ----------------------------------------------------------------------------------------

SLOW_TEST = threading.local()  # set by conftest for the running test: may it start servers?


def start_server(store: Path, tmp: Path, *, ready_timeout: float = 120, **env: str) -> LiveServer:
    """A real server on 127.0.0.1 (see bench.harness), polling the store every 0.5 s. Only tests marked
    slow start one: the quick loop (`-m "not slow"`) starts no server."""
    assert getattr(SLOW_TEST, "value", True), "a test that starts a real server must be marked slow"
    env.setdefault("IMGSERVE_POLL_INTERVAL_S", "0.5")
    return ServerProcess(store, tmp / f"server-{time.monotonic_ns()}.log", ready_timeout=ready_timeout, **env)


def served_everywhere(server: LiveServer, model: str) -> set[int | None] | None:
    """The versions of `model` that the server's processes serve (one each), or None while not ready."""
    r = httpx.get(server.url + "/health/ready", timeout=10)
    if r.status_code != 200:
        return None
    return {p["models"].get(model) for p in r.json()["processes"]}


def post(client: httpx.Client, path: Path, **params: object) -> httpx.Response:
    return client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                       params={"top_k": 3, **params})


class Load:
    """Closed-loop load from a few threads until the block ends, bounded in count and time (so that a fast
    machine does not run out of requests before a test's last check); records every answer."""

    PER_CLIENT = 20_000
    MAX_S = 300.0

    def __init__(self, url: str, images: list[Path], clients: int = 4) -> None:
        self.url, self.images, self.clients = url, images, clients
        self.deadline = math.inf
        self.stop = threading.Event()
        self.results: list[tuple[int, int | None, str | None]] = []
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = 0
            while not self.stop.is_set() and n < self.PER_CLIENT and time.monotonic() < self.deadline:
                p = self.images[(i + n) % len(self.images)]
                n += 1
                try:
                    r = post(client, p)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                body = r.json()
                self.results.append((r.status_code, body.get("version"), r.headers.get("x-model-version")))

    def answered(self) -> int:
        return len(self.results)

    def __enter__(self) -> Load:
        self.deadline = time.monotonic() + self.MAX_S
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    elapsed_s: float


def burst(url: str, body: bytes | list[bytes], n: int, path: str = "/predict",
          content_type: str = "image/jpeg") -> list[Answer]:
    """n requests that reach the server at once: every connection is opened first, then all are sent
    together from threads released by one barrier, so the server sees them in flight together (an
    httpx call per thread spends milliseconds on its own client before it sends). `body` is one body
    for all, or one per request; answers come back in the order of the requests."""
    parts = urlsplit(url)
    bodies = body if isinstance(body, list) else [body] * n
    assert len(bodies) == n, (len(bodies), n)

    def request(data: bytes) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data

    socks = [socket.create_connection((parts.hostname, parts.port), timeout=60) for _ in range(n)]
    gate = threading.Barrier(n)
    answers: list[Answer | None] = [None] * n

    def one(i: int) -> None:
        sock = socks[i]
        gate.wait()
        t = time.perf_counter()
        sock.sendall(request(bodies[i]))
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
        answers[i] = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.perf_counter() - t)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    finally:
        for sock in socks:
            sock.close()
    missing = [i for i, a in enumerate(answers) if a is None]
    assert not missing, f"{len(missing)} of {n} requests got no answer"
    return [a for a in answers if a is not None]


# -- gRPC ------------------------------------------------------------------------------------------------

def grpc_infer(target: str, model: str, images: list[bytes], timeout: float = 30,
               **metadata: str) -> tuple[np.ndarray, dict[str, str]]:
    """ModelInfer (KServe v2 / Triton gRPC) of encoded images on `target` (host:port): the probabilities and
    the trailing metadata. Raises grpc.RpcError with the call's status. Each call opens its own connection."""
    import grpc

    from service.rpc import protos

    req = protos.message("inference.ModelInferRequest")(model_name=model)
    req.inputs.add(name="images", datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(images)
    resp_cls = protos.message("inference.ModelInferResponse")
    # a connection of its own: channels to one target otherwise share one from gRPC's global subchannel pool
    # while it lives, so callers that count on new connections (spread over processes) would not get them
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        fn = channel.unary_unary(f"/{protos.KSERVE}/ModelInfer", request_serializer=lambda x: x.SerializeToString(),
                                 response_deserializer=resp_cls.FromString)
        resp, call = fn.with_call(req, timeout=timeout, metadata=tuple(metadata.items()) or None)
    out = resp.outputs[0]
    probs = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(out.shape))
    return probs, dict(call.trailing_metadata() or ())


def grpc_health(target: str, service: str = "") -> str:
    """The grpc.health.v1 status of `service` on `target`: SERVING, NOT_SERVING, or the call's error code."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            return str(exc.code().name)  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


# -- object storage --------------------------------------------------------------------------------------

@dataclass
class S3:
    """A real S3 API server on 127.0.0.1 (moto's threaded server) and a bucket of the test's own."""

    endpoint: str
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/models"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "models/") -> dict[str, int]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def settings(self) -> dict[str, Any]:
        """Service settings for a store in this bucket."""
        return {"model_store": self.url, "s3_endpoint_url": self.endpoint, "s3_access_key_id": "testing",
                "s3_secret_access_key": "testing"}
