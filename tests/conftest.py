"""Shared fixtures: a real model trained by `train`, fake classifiers, and a real uvicorn process."""

from __future__ import annotations

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGSERVE_SHARED", REPO.parent / "shared"))
CLOTHING = SHARED / "datasets" / "clothing-small"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(store: Path, tmp: Path, *, ready_timeout: float = 120, **env: str) -> LiveServer:
    """`python -m service` on 127.0.0.1 and a free port, returned once /health/ready answers 200."""
    port = free_port()
    full_env = {**os.environ, "IMGSERVE_HOST": "127.0.0.1", "IMGSERVE_PORT": str(port),
                "IMGSERVE_MODEL_STORE": str(store), "IMGSERVE_POLL_INTERVAL_S": "0.5", **env}
    log = tmp / f"server-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=full_env, stdout=fh,
                                stderr=subprocess.STDOUT)
    server = LiveServer(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.logs()}")
        try:
            if httpx.get(server.url + "/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.logs()}")


@pytest.fixture
def live(trained: Trained, tmp_path: Path) -> Iterator[LiveServer]:
    """A real server on a private copy of the trained store (tests may publish into it)."""
    store = tmp_path / "store"
    shutil.copytree(trained.store, store)
    server = start_server(store, tmp_path)
    yield server
    server.stop(signal.SIGKILL if server.proc.poll() is None else 0)


class FakeClassifier:
    """Stands in for a SavedModel in app tests: the class is the image's mean red value bucket."""

    def __init__(self, meta: object, fail_warmup: bool = False) -> None:
        self.meta = meta
        self.batches: list[int] = []
        self.fail_warmup = fail_warmup

    def predict_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        self.batches.append(len(rows))
        k = self.meta.num_classes  # type: ignore[attr-defined]
        out = np.full((len(rows), k), 0.1 / max(k - 1, 1), np.float32)
        for i, r in enumerate(rows):
            out[i, int(r[..., 0].mean()) * k // 256] = 0.9
        return out

    def warmup(self, batch_sizes: list[int], in_flight: int = 1) -> float:
        if self.fail_warmup:
            raise RuntimeError("warm-up exploded")
        return 0.0


def write_fake_version(store: Path, name: str, version: int, labels: list[str], size: int = 16) -> Path:
    from service.store import publish

    def write(tmp: Path) -> None:
        (tmp / "saved_model.pb").write_bytes(b"fake")

    final = publish(store, name, write, {
        "created_at": "2026-01-01T00:00:00Z", "labels": labels,
        "input": {"height": size, "width": size, "channels": 3, "dtype": "uint8", "color": "RGB"},
        "backbone": "fake", "weights": "none", "metrics": {}, "dataset": {}, "training": {},
    })
    assert final.name == str(version)
    return final
