"""The progressive controller (service/progressive.py) against the app with fake runtimes: a version that
agrees and does not fail goes shadow -> canary -> stable; one that disagrees is rolled back in the shadow
stage; one that fails requests is rolled back in the canary stage. Every step reads the app's own metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service import rollout
from service.pipeline import _SHADOW_TASKS
from service.progressive import Thresholds, p99, step
from service.rollout import RolloutState
from tests.support import LABELS, FakeClassifier, app_client, eventually, jpeg, write_fake_version

TH = Thresholds(shadow_rows=12, min_agreement=0.9, canary_percent=50, canary_requests=12)


class Inverted(FakeClassifier):
    def predict(self, images: np.ndarray) -> np.ndarray:
        return super().predict(images)[:, ::-1].copy()


class FailsOnBright(FakeClassifier):
    """Answers like version 1, but fails every bright image once warm (warm-up images are black)."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        if images[..., 0].mean() > 200:
            raise RuntimeError("this version cannot do bright images")
        return super().predict(images)


async def drive(c: httpx.AsyncClient, store: Path, reds: list[int], steps: int = 60) -> list[dict[str, Any]]:
    """Alternate controller steps and rounds of requests until the stage ends or `steps` rounds pass;
    the events the controller wrote."""
    reg = c.app.state.registry  # type: ignore[attr-defined]
    for _ in range(steps):
        state = rollout.read(store, "m")
        assert state is not None
        p = rollout.plan(state, rollout.candidates(store, "m"), 1.0)
        listing = (await c.get("/v1/models")).json()["models"][0]["versions"]
        moved = step(state, p, {v["version"]: v["state"] for v in listing}, (await c.get("/metrics")).text, "m", TH)
        if moved is not None:
            rollout.write(store, "m", *moved)
            await reg.scan()
            if moved[1]["command"] in ("promote", "rollback"):
                break
            continue
        for red in reds:  # one at a time, each shadow copy done before the next: the shadow is always idle
            await c.post("/predict", content=jpeg(red), headers={"Content-Type": "image/jpeg"})
            await eventually(lambda: not _SHADOW_TASKS, what="shadow copies done")
            await asyncio.sleep(0)
    state = rollout.read(store, "m")
    assert state is not None
    return [e for e in state.history if e.get("by") == "progressive controller"]


async def start(store: Path) -> None:
    write_fake_version(store, "m", 1, LABELS)
    rollout.write(store, "m", RolloutState(mode="progressive", stable=1, seen=1))
    write_fake_version(store, "m", 2, LABELS)


async def test_a_good_version_goes_shadow_canary_stable(tmp_path: Path) -> None:
    await start(tmp_path)
    async with app_client(tmp_path, inline_run_max_ms=0) as c:
        r = await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})
        assert r.headers["x-model-version"] == "1"  # progressive: the new version waits for the controller
        assert "waiting for the progressive controller" in (await c.get("/v1/models")).json()["models"][0][
            "versions"][1]["gate"]
        events = await drive(c, tmp_path, [10, 128, 250])
        assert [e["command"] for e in events] == ["shadow", "canary", "promote"]
        assert events[1]["agreement"] == 1.0 and events[2]["canary_errors"] == 0
        r = await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})
        assert r.headers["x-model-version"] == "2" and r.headers["x-model-role"] == "stable"


async def test_a_version_that_disagrees_is_rolled_back_in_the_shadow_stage(tmp_path: Path) -> None:
    await start(tmp_path)
    async with app_client(tmp_path, inline_run_max_ms=0,
                          loader=lambda p, m: (Inverted if m.version == 2 else FakeClassifier)(m)) as c:
        events = await drive(c, tmp_path, [10, 250])
        assert [e["command"] for e in events] == ["shadow", "rollback"]
        assert "top-1 agreement 0.000" in events[-1]["reason"]
        listing = (await c.get("/v1/models")).json()["models"][0]["versions"]
        assert listing[1]["role"] == "held" and "progressive: top-1 agreement" in listing[1]["reason"]
        r = await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})
        assert r.headers["x-model-version"] == "1"


async def test_a_version_that_fails_requests_is_rolled_back_in_the_canary_stage(tmp_path: Path) -> None:
    await start(tmp_path)
    async with app_client(tmp_path, inline_run_max_ms=0,
                          loader=lambda p, m: (FailsOnBright if m.version == 2 else FakeClassifier)(m)) as c:
        events = await drive(c, tmp_path, [10, 250])
        assert [e["command"] for e in events] == ["shadow", "canary", "rollback"]
        assert "server errors" in events[-1]["reason"]
        state = rollout.read(tmp_path, "m")
        assert state is not None and state.stable == 1 and state.canary is None and 2 in state.held


def test_p99_from_two_reads_of_the_buckets() -> None:
    then = {"0.01": 0.0, "0.1": 0.0, "1.0": 0.0, "+Inf": 0.0}
    now = {"0.01": 90.0, "0.1": 99.0, "1.0": 100.0, "+Inf": 100.0}
    assert p99(now, then) == 0.1
    assert p99(then, then) is None
