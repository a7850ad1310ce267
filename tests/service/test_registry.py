"""The registry (service/registry.py) with a fake runtime: which version a request resolves to, swapping
in a new version while the old one finishes its requests, unloading, and the drain cut-off."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from service import rollout
from service.batcher import BatcherStopped
from service.errors import BadRequest, NotFound, NotReady
from service.metrics import Metrics
from service.registry import Registry
from service.rollout import RolloutState
from service.settings import Settings
from tests.support import (
    LABELS,
    FakeClassifier,
    app_client,
    eventually,
    eventually_async,
    jpeg,
    metric_sum,
    write_fake_version,
)


def registry(store: Path, loader: object = None, **settings: object) -> Registry:
    return Registry(Settings(model_store=store, **settings), Metrics(),  # type: ignore[arg-type]
                    loader or (lambda p, m: FakeClassifier(m)))  # type: ignore[arg-type]


async def test_resolve_names_what_is_served(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    with pytest.raises(NotReady):
        reg.resolve(None)
    write_fake_version(tmp_path, "a", 1, LABELS)
    await reg.scan()
    assert reg.resolve(None).name == "a"  # the only model
    write_fake_version(tmp_path, "b", 1, LABELS)
    await reg.scan()
    with pytest.raises(BadRequest, match="several models are served \\(a, b\\)"):
        reg.resolve(None)
    with pytest.raises(NotFound, match="served models: a, b"):
        reg.resolve("c")
    with pytest.raises(NotFound, match="loaded versions: 1"):
        reg.resolve("a", 2)
    assert registry(tmp_path, default_model="b").resolve is not None
    await reg.stop(1)


async def test_a_new_version_is_swapped_in_and_the_old_one_retired_after_its_requests(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1, LABELS)
    reg = registry(tmp_path)
    await reg.scan()
    old = reg.resolve("m")
    with old.acquire():  # a request still holds version 1
        write_fake_version(tmp_path, "m", 2, LABELS)
        await reg.scan()
        assert reg.resolve("m").version == 2  # new requests go to 2 at once
        await asyncio.sleep(0)
        assert old.batcher.accepting  # but 1 is not stopped under its request
    await asyncio.wait_for(asyncio.gather(*reg._retiring), 10)
    assert not old.batcher.accepting  # retired once its request was done
    await reg.stop(1)


async def test_unload_and_load_again(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1, LABELS)
    reg = registry(tmp_path)
    await reg.scan()
    await reg.unload("m")
    with pytest.raises(NotReady):
        reg.resolve("m")
    await reg.scan()
    assert "m" not in reg.served  # a scan does not bring an unloaded model back
    assert (await reg.load("m")).version == 1
    with pytest.raises(NotFound, match="not in the model store"):
        await reg.load("nope")
    await reg.stop(1)


async def test_the_drain_gives_up_on_queued_rows_at_the_timeout(tmp_path: Path) -> None:
    """Rows still queued when the drain timeout passes fail with BatcherStopped (a 503 for their callers);
    the registry's stop returns instead of waiting for a model that never finishes."""
    write_fake_version(tmp_path, "m", 1, LABELS)
    gate = threading.Event()
    gate.set()

    class Held(FakeClassifier):
        def predict(self, images: np.ndarray) -> np.ndarray:
            gate.wait(60)
            return super().predict(images)

    reg = registry(tmp_path, loader=lambda p, m: Held(m), max_batch_size=1, inline_run_max_ms=0, drain_timeout_s=0.2)
    await reg.scan()
    gate.clear()
    served = reg.resolve("m")
    row = np.zeros((16, 16, 3), np.uint8)
    futures = served.batcher.submit([row]) + served.batcher.submit([row]) + served.batcher.submit([row])
    await asyncio.wait_for(reg.stop(0.2), 30)  # what the app's lifespan does with IMGSERVE_DRAIN_TIMEOUT_S
    settled = await asyncio.gather(*futures[1:], return_exceptions=True)
    assert any(isinstance(r, BatcherStopped) for r in settled), settled
    gate.set()


# -- several versions, roles and routing, through the app -----------------------------------------------

class Inverted(FakeClassifier):
    """Answers the opposite class (so a test can tell which version answered from the body alone)."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        return super().predict(images)[:, ::-1].copy()


def by_version(kinds: dict[int, type[FakeClassifier]]) -> Callable[[Path, Any], FakeClassifier]:
    return lambda path, meta: kinds.get(meta.version, FakeClassifier)(meta)


async def predict(c: httpx.AsyncClient, query: str = "", **headers: str) -> httpx.Response:
    return await c.post(f"/predict?{query}", content=jpeg(250), headers={"Content-Type": "image/jpeg", **headers})


def three_versions(store: Path) -> None:
    for v in (1, 2, 3):
        write_fake_version(store, "m", v, LABELS)


async def test_versions_and_labels_are_addressed_on_every_protocol(tmp_path: Path) -> None:
    three_versions(tmp_path)
    rollout.write(tmp_path, "m", RolloutState(stable=2, canary=3, canary_percent=0.0001, labels={"old": 1}, seen=3))
    async with app_client(tmp_path, loader=by_version({3: Inverted})) as c:
        await eventually_async(lambda: c.get("/v1/models"),
                               lambda r: [v["state"] for v in r.json()["models"][0]["versions"]] == ["AVAILABLE"] * 3)
        listing = (await c.get("/v1/models")).json()["models"][0]
        assert {v["version"]: v["role"] for v in listing["versions"]} == {1: "available", 2: "stable", 3: "canary"}
        for query, version, role in [("version=1", 1, "available"), ("label=old", 1, "available"),
                                     ("label=stable", 2, "stable"), ("label=canary", 3, "canary"), ("", 2, "stable")]:
            r = await predict(c, query)
            assert r.status_code == 200 and r.json()["version"] == version, (query, r.text)
            assert r.headers["x-model-version"] == str(version) and r.headers["x-model-role"] == role
        assert (await predict(c, "label=canary")).json()["predictions"][0]["top"][0]["label"] == "dark"  # Inverted
        b64 = {"instances": [{"b64": base64.b64encode(jpeg(250)).decode()}]}
        assert (await c.post("/v1/models/m/labels/old:predict", json=b64)).headers["x-model-version"] == "1"
        assert (await c.post("/v1/models/m/versions/3:predict", json=b64)).headers["x-model-version"] == "3"
        status = (await c.get("/v1/models/m")).json()["model_version_status"]
        assert [s["version"] for s in status] == ["1", "2", "3"]
        kserve = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                              "data": [base64.b64encode(jpeg(250)).decode()]}]}
        assert (await c.post("/v2/models/m/versions/1/infer", json=kserve)).json()["model_version"] == "1"
        assert (await c.get("/v2/models/m")).json()["versions"] == ["1", "2", "3"]
        r = await predict(c, "version=4")
        assert r.status_code == 404 and "loaded versions: 1, 2, 3" in r.json()["error"]
        r = await predict(c, "label=nope")
        assert r.status_code == 404 and "labels: canary, stable, old" in r.json()["error"]
        assert (await predict(c, "label=Not%20A%20Label")).status_code == 400
        assert (await c.post("/v1/models/m/labels/nope:predict", json=b64)).status_code == 404


async def test_the_canary_takes_its_share_and_a_routing_key_sticks(tmp_path: Path) -> None:
    three_versions(tmp_path)
    rollout.write(tmp_path, "m", RolloutState(stable=2, canary=3, canary_percent=30, seen=3))
    async with app_client(tmp_path) as c:
        await eventually_async(lambda: c.get("/v1/models"),
                               lambda r: r.json()["models"][0]["rollout"]["canary"] == 3)
        plain = [(await predict(c)).headers["x-model-version"] for _ in range(400)]
        share = plain.count("3") / len(plain)
        assert 0.2 < share < 0.4, share  # 30% of 400: a binomial, 5 standard deviations either side
        for key in ("alice", "bob", "carol", "dave"):
            seen = {(await predict(c, **{"X-Route-Key": key})).headers["x-model-version"] for _ in range(20)}
            assert len(seen) == 1, (key, seen)


async def test_a_shadow_never_changes_the_answer_and_is_compared(tmp_path: Path) -> None:
    three_versions(tmp_path)
    gate = threading.Event()
    gate.set()

    class Slow(Inverted):  # answers differently, and only when the test lets it
        def predict(self, images: np.ndarray) -> np.ndarray:
            gate.wait(30)
            return super().predict(images)

    rollout.write(tmp_path, "m", RolloutState(stable=2, shadow=3, shadow_percent=100, seen=3))
    async with app_client(tmp_path, loader=by_version({3: Slow}), inline_run_max_ms=0, max_batch_size=1) as c:
        await eventually_async(lambda: c.get("/v1/models"),
                               lambda r: r.json()["models"][0]["rollout"]["shadow"] == 3)
        gate.clear()  # the shadow is slow now: answers must not wait for it
        r = await predict(c)
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        assert r.json()["predictions"][0]["top"][0]["label"] == "bright"  # stable's answer, not the shadow's
        shadow = c.app.state.registry.models["m"].loaded[3]  # type: ignore[attr-defined]
        await eventually(lambda: shadow.batcher.running_rows == 1, what="the shadow copy running")
        r = await predict(c)  # the shadow is busy: a copy waits behind it, up to a batch (one row here)
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        await eventually(lambda: shadow.batcher.depth == 1, what="a copy queued")
        r = await predict(c)  # a batch is already waiting: this copy is dropped
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        gate.set()

        def counts() -> dict[str, float]:
            text = metrics_text[0]
            return {o: metric_sum(text, "imgserve_shadow_requests_total", version="3", against="2", outcome=o)
                    for o in ("compared", "dropped", "failed")}

        metrics_text = [""]

        async def read() -> dict[str, float]:
            metrics_text[0] = (await c.get("/metrics")).text
            return counts()

        got = await eventually_async(read, lambda n: n["compared"] == 2)
        assert got == {"compared": 2, "dropped": 1, "failed": 0}
        text = metrics_text[0]
        assert metric_sum(text, "imgserve_shadow_rows_total", version="3") == 2
        assert metric_sum(text, "imgserve_shadow_top1_agreements_total", version="3") == 0  # it disagreed
        assert metric_sum(text, "imgserve_rollout_role", model="m", version="3", role="shadow") == 1
        pairs = (await c.get("/v1/models/m/rollout")).json()["serving"]["shadow_pairs"]
        assert pairs == [{"version": 3, "against": 2, "copies_run": 2, "dropped": 1, "failed": 0, "rows": 2,
                          "top1_agreement": 0.0, "mean_top_probability_change": pytest.approx(0.0, abs=1e-6),
                          "mean_seconds": pairs[0]["mean_seconds"]}] and pairs[0]["mean_seconds"] > 0


async def test_a_failing_shadow_is_counted_and_the_caller_never_sees_it(tmp_path: Path) -> None:
    three_versions(tmp_path)
    broken = threading.Event()

    class Breaks(FakeClassifier):
        def predict(self, images: np.ndarray) -> np.ndarray:
            if broken.is_set():
                raise RuntimeError("shadow exploded")
            return super().predict(images)

    rollout.write(tmp_path, "m", RolloutState(stable=2, shadow=3, shadow_percent=100, seen=3))
    async with app_client(tmp_path, loader=by_version({3: Breaks})) as c:
        await eventually_async(lambda: c.get("/v1/models"), lambda r: r.json()["models"][0]["rollout"]["shadow"] == 3)
        broken.set()
        for _ in range(3):
            r = await predict(c)
            assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        await eventually_async(lambda: c.get("/metrics"), lambda r: metric_sum(
            r.text, "imgserve_shadow_requests_total", version="3", outcome="failed") >= 1)


@pytest.mark.parametrize("text", ['{"format": 1, "stable": ', "[1, 2]", '{"format": 1, "stable": 9}', "",
                                  '{"format": 1, "canary_percent": 250}', '{"format": 7}', '{"format": 1, "mode": 3}'])
async def test_a_bad_rollout_file_keeps_the_last_good_state(tmp_path: Path, text: str) -> None:
    three_versions(tmp_path)
    rollout.write(tmp_path, "m", RolloutState(stable=1, seen=3))
    async with app_client(tmp_path) as c:
        await eventually_async(lambda: predict(c), lambda r: r.headers["x-model-version"] == "1")
        (tmp_path / "m" / "rollout.json").write_text(text)
        scans = metric_sum((await c.get("/metrics")).text, "imgserve_store_scans_total")
        await eventually_async(lambda: c.get("/metrics"),
                               lambda r: metric_sum(r.text, "imgserve_store_scans_total") >= scans + 2)
        r = await predict(c)
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"  # never a 500, never no model
        rollout_view = (await c.get("/v1/models")).json()["models"][0]["rollout"]
        assert rollout_view["stable"] == 1 and "rollout.json" in rollout_view["state_error"]
        metrics = (await c.get("/metrics")).text
        assert metric_sum(metrics, "imgserve_rollout_state_errors_total", model="m") == 1  # once, not per scan
        (tmp_path / "m" / "rollout.json").write_text('{"format": 1, "stable": 2, "seen": 3}')  # fixed: followed
        await eventually_async(lambda: predict(c), lambda r: r.headers["x-model-version"] == "2")
        assert "state_error" not in (await c.get("/v1/models")).json()["models"][0]["rollout"]


async def test_the_version_cap_refuses_past_it_and_says_so(tmp_path: Path) -> None:
    three_versions(tmp_path)
    async with app_client(tmp_path, version_policy="all", max_versions_per_model=2) as c:
        listing = await eventually_async(lambda: c.get("/v1/models"), lambda r: sum(
            v["state"] == "AVAILABLE" for v in r.json()["models"][0]["versions"]) == 2)
        versions = {v["version"]: v for v in listing.json()["models"][0]["versions"]}
        assert versions[3]["role"] == "stable" and versions[2]["role"] == "available"
        assert "at most 2 per model" in versions[1]["reason"]


async def test_a_rollback_retires_what_no_role_needs(tmp_path: Path) -> None:
    three_versions(tmp_path)
    async with app_client(tmp_path, version_policy="none") as c:
        await eventually_async(lambda: predict(c), lambda r: r.headers["x-model-version"] == "3")
        reg = c.app.state.registry  # type: ignore[attr-defined]
        three = reg.models["m"].loaded[3]
        rollout.run_command(tmp_path, "m", "rollback", {}, 1.0)
        await eventually_async(lambda: predict(c), lambda r: r.headers["x-model-version"] == "2")
        assert set(reg.models["m"].loaded) == {2}
        await eventually(lambda: not three.batcher.accepting, what="version 3 retired")
        listing = (await c.get("/v1/models")).json()["models"][0]["versions"]
        assert listing[2] == {"version": 3, "state": "NOT_LOADED", "role": "held",
                              "reason": "rolled back by operator"}


async def test_the_admin_endpoints_run_commands_behind_the_admin_key(tmp_path: Path) -> None:
    three_versions(tmp_path)
    async with app_client(tmp_path, admin_api_key=SecretStr("adm"), version_policy="none") as c:
        await eventually_async(lambda: predict(c), lambda r: r.headers["x-model-version"] == "3")
        for headers in ({}, {"X-API-Key": "nope"}):
            r = await c.post("/v1/models/m/rollout/rollback", headers=headers)
            assert r.status_code == 401
        assert not (tmp_path / "m" / "rollout.json").exists()
        admin = {"X-API-Key": "adm"}
        r = await c.post("/v1/models/m/rollout/canary", json={"percent": 250}, headers=admin)
        assert r.status_code == 400 and "0 to 100" in r.json()["error"]
        assert (await c.post("/v1/models/m/rollout/explode", headers=admin)).status_code == 400
        assert (await c.post("/v1/models/nope/rollout/rollback", headers=admin)).status_code == 404
        assert not (tmp_path / "m" / "rollout.json").exists()  # refused: nothing written
        r = await c.post("/v1/models/m/rollout/rollback", headers=admin)
        assert r.status_code == 200 and r.json()["stable"] == 2
        r = await predict(c)  # this process follows at once
        assert r.headers["x-model-version"] == "2"
        r = await c.post("/v1/models/m/rollout/canary", json={"percent": 100, "version": 3}, headers=admin)
        assert r.status_code == 200
        assert (await predict(c)).headers["x-model-role"] == "canary"
        status = (await c.get("/v1/models/m/rollout")).json()
        assert status["canary"] == 3 and status["serving"]["loaded"] == [2, 3]
        assert [e["command"] for e in status["state"]["history"]] == ["rollback", "canary"]


async def test_a_canary_that_fails_to_load_ends_its_stage_and_stable_answers(tmp_path: Path) -> None:
    three_versions(tmp_path)

    def loader(path: Path, meta: Any) -> FakeClassifier:
        if meta.version == 3:
            raise RuntimeError("version 3's graph is broken")
        return FakeClassifier(meta)

    rollout.write(tmp_path, "m", RolloutState(stable=2, canary=3, canary_percent=50, seen=3))
    async with app_client(tmp_path, loader=loader) as c:
        listing = await eventually_async(lambda: c.get("/v1/models"), lambda r: any(
            v["state"] == "FAILED" for v in r.json()["models"][0]["versions"]))
        model = listing.json()["models"][0]
        assert model["versions"][2]["role"] == "failed" and "graph is broken" in model["versions"][2]["reason"]
        assert model["rollout"]["canary"] is None and model["rollout"]["stable"] == 2
        versions = {(await predict(c)).headers["x-model-version"] for _ in range(20)}
        assert versions == {"2"}
