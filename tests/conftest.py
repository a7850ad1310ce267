"""Shared fixtures: a real model trained by `train`, fake classifiers, and a real uvicorn process."""

from __future__ import annotations

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import http.client  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bench.harness import REPO, SHARED, ServerProcess, free_port, metric_sum  # noqa: E402

__all__ = ["REPO", "free_port", "metric_sum"]
CLOTHING = SHARED / "datasets" / "clothing-small"


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


@pytest.fixture(scope="session")
def clothing() -> Path:
    if not CLOTHING.is_dir():
        pytest.fail(f"the shared dataset is missing at {CLOTHING}")
    return CLOTHING


@dataclass
class Trained:
    store: Path
    name: str
    version: int
    height: int
    width: int
    labels: list[str]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, clothing: Path) -> Trained:
    """A real SavedModel published by `train`: a small CNN on a few clothing photos per class."""
    from train.pipeline import TrainConfig, run

    store_dir = tmp_path_factory.mktemp("store")
    result = run(TrainConfig(data=clothing, store=store_dir, name="clothing", backbone="cnn", weights="none",
                             image_size=48, max_per_class=6, head_epochs=2, batch_size=16, workers=2))
    meta = json.loads((result.version_dir / "model.json").read_text())
    return Trained(store_dir, "clothing", meta["version"], 48, 48, meta["labels"])


def clone_version(store: Path, name: str, src: int, dst: int, mutate: dict[str, object] | None = None) -> Path:
    """Publish a copy of version `src` as `dst` the way train does: a hidden folder renamed into place."""
    tmp = store / name / f".tmp-clone-{dst}"
    shutil.copytree(store / name / str(src), tmp)
    meta = json.loads((tmp / "model.json").read_text())
    meta.update({"version": dst, **(mutate or {})})
    (tmp / "model.json").write_text(json.dumps(meta))
    final = store / name / str(dst)
    tmp.rename(final)
    return final


LiveServer = ServerProcess


def served_everywhere(server: LiveServer, model: str) -> set[int | None] | None:
    """The versions of `model` that the server's processes serve (one each), or None while not ready."""
    import httpx

    r = httpx.get(server.url + "/health/ready", timeout=10)
    if r.status_code != 200:
        return None
    return {p["models"].get(model) for p in r.json()["processes"]}


def served_runtime(trained: Trained, **settings: object) -> object:
    """In process, the runtime a server with these settings picks for the trained version (a variant or
    the SavedModel): what its answers must equal."""
    from service import runtimes, store
    from service.settings import Settings

    path = trained.store / trained.name / str(trained.version)
    return runtimes.load(path, store.read_metadata(path), Settings(**settings))


def start_server(store: Path, tmp: Path, *, ready_timeout: float = 120, **env: str) -> LiveServer:
    """A real server on 127.0.0.1 (see bench.harness), polling the store every 0.5 s."""
    env.setdefault("IMGSERVE_POLL_INTERVAL_S", "0.5")
    return ServerProcess(store, tmp / f"server-{time.monotonic_ns()}.log", ready_timeout=ready_timeout, **env)


@pytest.fixture
def live(trained: Trained, tmp_path: Path) -> Iterator[LiveServer]:
    """A real server on a private copy of the trained store (tests may publish into it)."""
    store = tmp_path / "store"
    shutil.copytree(trained.store, store)
    server = start_server(store, tmp_path)
    yield server
    server.stop(signal.SIGKILL if server.proc.poll() is None else 0)


class FakeClassifier:
    """Stands in for a runtime in app tests: the class is the image's mean red value bucket."""

    runtime = "fake"
    precision = "fp32"

    def __init__(self, meta: object, fail_warmup: bool = False) -> None:
        self.meta = meta
        self.batches: list[int] = []
        self.fail_warmup = fail_warmup

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.fail_warmup:
            raise RuntimeError("warm-up exploded")
        self.batches.append(len(images))
        k = self.meta.num_classes  # type: ignore[attr-defined]
        out = np.full((len(images), k), 0.1 / max(k - 1, 1), np.float32)
        for i, r in enumerate(images):
            out[i, int(r[..., 0].mean()) * k // 256] = 0.9
        return out


def write_fake_version(store: Path, name: str, version: int, labels: list[str], size: int = 16,
                       **meta: object) -> Path:
    from service.metadata import ModelMeta
    from service.store import publish

    def write(tmp: Path) -> None:
        (tmp / "saved_model.pb").write_bytes(b"fake")

    final = publish(store, name, write, ModelMeta.create(labels=labels, size=(size, size), backbone="fake",
                                                             **meta))
    assert final.name == str(version)
    return final
