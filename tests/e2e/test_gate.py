"""The promotion gate end to end: `train` scores the version before it on its own test split and writes the
comparison into model.json; a server in the default (gated) mode holds a version trained badly, with the
reason, and promotes the next good one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, LiveServer, clothing_images, served_everywhere, start_server, wait_until
from train.pipeline import TrainConfig, run

pytestmark = pytest.mark.slow


def train_version(store: Path, clothing: Path, **kw: object) -> dict[str, object]:
    cfg = {"data": clothing, "store": store, "name": "shirts", "backbone": "cnn", "weights": "none",
           "image_size": 32, "max_per_class": 20, "head_epochs": 12, "batch_size": 16, "workers": 2,
           "variants": False, "time_budget_min": 0, "patience": 50, **kw}
    result = run(TrainConfig(**cfg))  # type: ignore[arg-type]
    return json.loads((result.version_dir / "model.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def first_version(tmp_path_factory: pytest.TempPathFactory, clothing: Path) -> Path:
    """A store holding version 1 of "shirts", trained once; each test copies it."""
    store = tmp_path_factory.mktemp("gate") / "store"
    good = train_version(store, clothing)
    assert "comparison" not in good  # the first version has nothing to be compared with
    return store


def model_versions(server: LiveServer, name: str) -> dict[int, dict[str, object]]:
    models = httpx.get(server.url + "/v1/models", timeout=10).json()["models"]
    return {v["version"]: v for m in models if m["name"] == name for v in m["versions"]}


def test_the_gate_holds_a_worse_version_and_promotes_a_better_one(tmp_path: Path, clothing: Path,
                                                                  first_version: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(first_version, store)
    good = json.loads((store / "shirts" / "1" / "model.json").read_text())
    server = start_server(store, tmp_path)
    try:
        # a version trained for too few steps (a learning rate that cannot move the weights)
        bad = train_version(store, clothing, head_learning_rate=1e-9, head_epochs=1)
        cmp = bad["comparison"]
        assert cmp["baseline_version"] == 1 and cmp["test_images"] == good["metrics"]["test_images"]  # type: ignore[index]
        assert cmp["baseline_accuracy"] == pytest.approx(good["metrics"]["accuracy"], abs=1e-9)  # type: ignore[index]
        assert cmp["accuracy"] < cmp["baseline_accuracy"] - 0.01, cmp  # type: ignore[index,operator]
        held = wait_until(lambda: model_versions(server, "shirts").get(2, {}).get("role") == "held"
                          and model_versions(server, "shirts")[2], 60, "version 2 held")
        assert "held by the gate" in held["reason"], held
        assert served_everywhere(server, "shirts") == {1}
        r = httpx.post(server.url + "/predict", content=clothing_images(1)[0].read_bytes(),
                       headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.headers["x-model-version"] == "1" and r.headers["x-model-role"] == "stable"
        # a version trained as well as the first is compared with the newest before it (the bad one): promoted
        better = train_version(store, clothing, seed=7)
        assert better["comparison"]["baseline_version"] == 2  # type: ignore[index]
        wait_until(lambda: served_everywhere(server, "shirts") == {3}, 60, "version 3 promoted")
        report = (store / "shirts" / "3" / "report" / "report.md").read_text()
        assert "Against version 2 (the one published before)" in report
        status = json.loads(subprocess.run([sys.executable, "-m", "service.rollout", "--store", str(store), "shirts",
                                            "status"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout)
        assert status["stable"] == 3 and "held by the gate" in status["held"]["2"]
    finally:
        assert server.stop() == 0




def watch_once(store: Path, server: LiveServer, *extra: str) -> dict[str, object] | None:
    r = subprocess.run([sys.executable, "-m", "service.rollout", "--store", str(store), "--max-accuracy-drop", "100",
                        "shirts", "watch", "--url", server.url, "--once", "--shadow-rows", "30", "--canary-requests",
                        "30", "--canary-percent", "50", "--max-p99-ratio", "1000", *extra], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def test_progressive_rolls_back_a_version_that_disagrees_and_promotes_one_that_agrees(
        tmp_path: Path, clothing: Path, first_version: Path) -> None:
    """The controller (`python -m service.rollout MODEL watch`) on a real server: a badly trained version goes
    to shadow and is rolled back on its agreement; a copy of the stable one goes shadow -> canary -> stable."""
    store = tmp_path / "store"
    shutil.copytree(first_version, store)
    subprocess.run([sys.executable, "-m", "service.rollout", "--store", str(store), "shirts", "mode", "progressive"],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    server = start_server(store, tmp_path, IMGSERVE_MAX_ACCURACY_DROP="100", IMGSERVE_INLINE_RUN_MAX_MS="0")
    images = [p.read_bytes() for p in clothing_images(30)]

    def drive(until: set[str]) -> list[str]:
        seen: list[str] = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(40):  # bounded: each round is 30 requests and one controller step
                event = watch_once(store, server)
                if event is not None:
                    seen.append(str(event["command"]))
                    if event["command"] in until:
                        return seen
                    wait_until(lambda e=event: model_versions(server, "shirts")[int(e["version"])]["state"]
                               == "AVAILABLE", 60, "the staged version loaded")
                    continue
                for body in images:  # one at a time: the shadow has idle capacity between them
                    assert c.post("/predict", content=body, headers={"Content-Type": "image/jpeg"}).status_code == 200
        return seen

    try:
        train_version(store, clothing, head_learning_rate=1e-9, head_epochs=1)  # version 2
        wait_until(lambda: "waiting for the progressive controller" in str(model_versions(server, "shirts")[2]
                                                                               .get("gate", "")), 60, "v2 waiting")
        assert drive({"rollback", "promote"}) == ["shadow", "rollback"]
        held = wait_until(lambda: model_versions(server, "shirts")[2]["role"] == "held"
                          and model_versions(server, "shirts")[2], 60, "v2 held")  # at the server's next scan
        assert "top-1 agreement" in str(held["reason"])
        assert served_everywhere(server, "shirts") == {1}
        shutil.copytree(store / "shirts" / "1", store / "shirts" / ".tmp-3")  # a copy of stable: agrees on all
        doc = json.loads((store / "shirts" / ".tmp-3" / "model.json").read_text())
        (store / "shirts" / ".tmp-3" / "model.json").write_text(json.dumps({**doc, "version": 3}))
        (store / "shirts" / ".tmp-3").rename(store / "shirts" / "3")
        wait_until(lambda: 3 in model_versions(server, "shirts"), 60, "v3 seen")
        assert drive({"rollback", "promote"}) == ["shadow", "canary", "promote"], \
            json.loads((store / "shirts" / "rollout.json").read_text())["history"][-1]
        wait_until(lambda: served_everywhere(server, "shirts") == {3}, 60, "v3 stable")
    finally:
        assert server.stop() == 0
