"""Object storage end to end: `train --store s3://...` publishes into a real S3 API (moto's server on
127.0.0.1), a real server with IMGSERVE_MODEL_STORE=s3://... serves it from its local cache, takes the
next version published there, and starts again from a warm cache without copying anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.support import S3, clothing_images, start_server, wait_until
from train.pipeline import TrainConfig, run

pytestmark = pytest.mark.slow


def train(clothing: Path, store: str, **kw: object) -> str:
    cfg = {"data": clothing, "store": store, "name": "shirts", "backbone": "cnn", "weights": "none",
           "image_size": 32, "max_per_class": 10, "head_epochs": 4, "batch_size": 16, "workers": 2,
           "variants": False, "time_budget_min": 0, **kw}
    return run(TrainConfig(**cfg)).published  # type: ignore[arg-type]


def test_train_publishes_to_s3_and_replicas_of_the_service_serve_it(s3: S3, clothing: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSERVE_S3_ENDPOINT_URL", s3.endpoint)
    assert train(clothing, s3.url) == f"{s3.url}/shirts/1"
    keys = s3.keys()
    assert "models/shirts/1/model.json" in keys and "models/shirts/1/saved_model.pb" in keys
    env = {"IMGSERVE_MODEL_STORE": s3.url, "IMGSERVE_S3_ENDPOINT_URL": s3.endpoint,
           "IMGSERVE_STORE_CACHE_DIR": str(tmp_path / "cache"), "IMGSERVE_POLL_INTERVAL_S": "0.5"}
    server = start_server(tmp_path / "unused", tmp_path, **env)
    image = clothing_images(1)[0]
    try:
        r = httpx.post(server.url + "/predict", content=image.read_bytes(), headers={"Content-Type": "image/jpeg"},
                       timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert httpx.get(server.url + "/v1/models", timeout=10).json()["store"]["url"] == s3.url
        # the next version, compared with version 1 (copied from the bucket for that), is served
        assert train(clothing, s3.url, seed=3) == f"{s3.url}/shirts/2"
        body = s3.client().get_object(Bucket=s3.bucket, Key="models/shirts/2/model.json")["Body"].read()
        assert json.loads(body)["comparison"]["baseline_version"] == 1
        assert wait_until(lambda: httpx.get(server.url + "/health/ready", timeout=5).json()["models"]["shirts"] == 2,
                          60, "version 2 served")
    finally:
        assert server.stop() == 0
    # a restart with the cache warm copies nothing
    again = start_server(tmp_path / "unused", tmp_path, **env)
    try:
        assert httpx.get(again.url + "/health/ready", timeout=5).json()["models"]["shirts"] == 2
        assert "fetched shirts" not in again.logs()
    finally:
        assert again.stop() == 0
    shutil.rmtree(tmp_path / "cache")
