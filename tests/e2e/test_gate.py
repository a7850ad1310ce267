"""The promotion gate end to end: `train` scores the version before it on its own test split and writes the
comparison into model.json; a server in the default (gated) mode holds a version trained badly, with the
reason, and promotes the next good one."""

from __future__ import annotations

import json
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


def model_versions(server: LiveServer, name: str) -> dict[int, dict[str, object]]:
    models = httpx.get(server.url + "/v1/models", timeout=10).json()["models"]
    return {v["version"]: v for m in models if m["name"] == name for v in m["versions"]}


def test_the_gate_holds_a_worse_version_and_promotes_a_better_one(tmp_path: Path, clothing: Path) -> None:
    store = tmp_path / "store"
    good = train_version(store, clothing)
    assert "comparison" not in good  # the first version has nothing to be compared with
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


