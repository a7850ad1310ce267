"""A real Prometheus server scrapes the service and the batch-size histogram reads back through its API."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer, clothing_images, free_port

pytestmark = pytest.mark.slow
SERVER_PROCESSES = ["1", "2"]  # see conftest.py


def test_prometheus_scrapes_batch_sizes(live: LiveServer, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus); .ci/run installs it")
    target = live.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: imgserve\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in clothing_images(6)]
            assert client.post("/predict", files=files).status_code == 200
        query = 'sum(imgserve_batch_size_sum{job="imgserve"})'
        value = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{api}/query", params={"query": query}, timeout=5).json()
                if r["status"] == "success" and r["data"]["result"]:
                    value = float(r["data"]["result"][0]["value"][1])
                    if value >= 6:
                        break
            except (httpx.HTTPError, ValueError):  # not up yet, or still starting (a non-JSON answer)
                pass
            time.sleep(0.5)
        assert value is not None and value >= 6, (tmp_path / "prometheus.log").read_text()[-2000:]
        targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
        assert targets[0]["health"] == "up"
        buckets = httpx.get(f"{api}/query", params={"query": 'imgserve_batch_size_bucket{le="8.0"}'}).json()
        assert buckets["data"]["result"], "histogram buckets are visible to Prometheus"
    finally:
        prom.terminate()
        prom.wait(30)
