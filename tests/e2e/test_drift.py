"""The drift score on a real server, serving a clothing model `train` made (with its test split's reference in
model.json): photos of one class only, or darkened to a fifth of their brightness, cross the alert within 500
answers; the test split itself, shuffled, stays below it over 2,000 answers. Each case is served by a
version of its own (a copy of the trained one), so each starts from an empty window."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.quality import DRIFT_ALERT
from tests.support import LiveServer, clone_version, served_everywhere, start_server, wait_until
from train.pipeline import TrainConfig, run

pytestmark = pytest.mark.slow
PER_REQUEST = 25


class Model:
    def __init__(self, store: Path, test_paths: list[Path]) -> None:
        self.store, self.test_paths, self.version = store, test_paths, 1


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, clothing: Path) -> Model:
    """A small CNN trained well enough that its answers depend on the photo (the session's tiny model is not)."""
    store = tmp_path_factory.mktemp("drift") / "store"
    result = run(TrainConfig(data=clothing, store=store, name="clothing", backbone="cnn", weights="none",
                             image_size=48, max_per_class=40, head_epochs=8, batch_size=32, workers=2,
                             variants=False, time_budget_min=0))
    mix = json.loads((result.version_dir / "model.json").read_text())["reference"]["class_mix"]
    assert max(mix) < 0.5, f"a model that answers one class for most photos shows no drift: {mix}"
    return Model(store, list(result.test_paths))


@pytest.fixture(scope="module")
def server(model: Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = start_server(model.store, tmp_path_factory.mktemp("drift-server"))
    yield s
    s.stop(signal.SIGKILL)


def fresh_version(model: Model, server: LiveServer) -> int:
    """A copy of the trained version as the next one, served: its window starts empty."""
    model.version += 1
    clone_version(model.store, "clothing", 1, model.version)
    wait_until(lambda: served_everywhere(server, "clothing") == {model.version}, 60, "the copy served")
    return model.version


def score(server: LiveServer, version: int) -> float:
    """The version's higher drift score (0 while it has none: too few answers yet)."""
    return max(server.metric("imgserve_drift_score", model="clothing", version=str(version), signal=s)
               for s in ("class_mix", "confidence"))


def send(server: LiveServer, photos: list[bytes], answers: int, version: int) -> list[tuple[int, float]]:
    """`answers` answers, PER_REQUEST photos a request, cycling through `photos`; the score after each request."""
    seen: list[tuple[int, float]] = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for start in range(0, answers, PER_REQUEST):
            batch = [photos[(start + i) % len(photos)] for i in range(PER_REQUEST)]
            r = c.post("/predict", files=[("file", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(batch)])
            assert r.status_code == 200 and r.json()["version"] == version, r.text
            seen.append((start + PER_REQUEST, score(server, version)))
    return seen


def darkened(path: Path) -> bytes:
    img = cv2.imread(str(path))
    ok, buf = cv2.imencode(".jpg", (img.astype(np.float32) / 5).round().astype(np.uint8))
    assert ok
    return buf.tobytes()


def crossed_at(seen: list[tuple[int, float]]) -> int | None:
    return next((n for n, s in seen if s > DRIFT_ALERT), None)


def test_the_test_split_shuffled_stays_below_the_alert(model: Model, server: LiveServer) -> None:
    version = fresh_version(model, server)
    photos = [p.read_bytes() for p in model.test_paths]
    random.Random(7).shuffle(photos)
    seen = send(server, photos, 2000, version)
    print(f"drift: test split shuffled, highest score over 2000 answers {max(s for _, s in seen):.3f}")
    assert max(s for _, s in seen) < DRIFT_ALERT, seen
    assert seen[-1][1] > 0  # scored: the window filled and the reference was read


def test_photos_of_one_class_cross_the_alert_within_500_answers(model: Model, server: LiveServer) -> None:
    version = fresh_version(model, server)
    one = [p.read_bytes() for p in model.test_paths if p.parent.name == model.test_paths[0].parent.name]
    seen = send(server, one, 500, version)
    at = crossed_at(seen)
    print(f"drift: one class, crossed {DRIFT_ALERT} after {at} answers; score at 500: {seen[-1][1]:.3f}")
    assert at is not None and at <= 500, seen


def test_darkened_photos_cross_the_alert_within_500_answers(model: Model, server: LiveServer) -> None:
    version = fresh_version(model, server)
    dark = [darkened(p) for p in model.test_paths]
    random.Random(7).shuffle(dark)
    seen = send(server, dark, 500, version)
    at = crossed_at(seen)
    print(f"drift: darkened, crossed {DRIFT_ALERT} after {at} answers; score at 500: {seen[-1][1]:.3f}")
    assert at is not None and at <= 500, seen
