"""Several server processes behind one port (IMGSERVE_WORKERS): one service to the outside."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import LiveServer, Trained, clone_version, clothing_images, metric_sum, start_server, wait_until

pytestmark = pytest.mark.slow
SERVER_PROCESSES = ["2"]  # about several processes behind one port; see conftest.py


@pytest.fixture
def two(trained: Trained, tmp_path: Path, server_processes: int) -> Iterator[LiveServer]:
    shutil.copytree(trained.store, tmp_path / "store")
    server = start_server(tmp_path / "store", tmp_path)
    yield server
    server.stop(signal.SIGKILL if server.proc.poll() is None else 0)


def fresh_post(url: str, image: bytes) -> httpx.Response:
    """One request on its own connection, so that requests spread over the processes."""
    return httpx.post(url + "/predict", content=image, headers={"Content-Type": "image/jpeg", "Connection": "close"},
                      timeout=30)


def per_process(text: str, name: str) -> dict[str, float]:
    return {s.labels["pid"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name}


def test_metrics_of_two_processes_add_up(two: LiveServer) -> None:
    workers = two.workers()
    assert len(workers) == 2 and two.proc.pid not in workers
    images = [p.read_bytes() for p in clothing_images(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: fresh_post(two.url, images[i % 8]), range(60)))
    assert [r.status_code for r in answers] == [200] * 60
    for _ in range(6):  # each scrape lands on either process, and every one sees the sum of both
        text = httpx.get(two.url + "/metrics", headers={"Connection": "close"}).text
        assert metric_sum(text, "imgserve_http_requests_total", handler="/predict", status="200") == 60
        assert metric_sum(text, "imgserve_rows_total") == 60
        assert metric_sum(text, "imgserve_server_processes") == 2
        by_pid = per_process(text, "imgserve_server_process_requests")
        assert set(by_pid) == {str(p) for p in workers}
        # (how the kernel spreads connections over the two processes is its choice, not the service's)
        assert sum(by_pid.values()) == metric_sum(text, "imgserve_http_requests_total")
        assert set(per_process(text, "imgserve_server_process_resident_memory_bytes")) == set(by_pid)


def test_ready_only_when_every_process_can_serve(two: LiveServer) -> None:
    body = httpx.get(two.url + "/health/ready").json()
    assert [p["ready"] for p in body["processes"]] == [True, True]
    victim = two.workers()[1]
    os.kill(victim, signal.SIGKILL)
    image = clothing_images(1)[0].read_bytes()
    seen_not_ready = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = httpx.get(two.url + "/health/ready", headers={"Connection": "close"}, timeout=10)
        if r.status_code == 503:
            seen_not_ready = True
            assert "server process 2 of 2" in r.json()["error"] or "server process 1 of 2" in r.json()["error"]
            assert fresh_post(two.url, image).status_code == 200  # the other process still answers
        elif seen_not_ready:
            break
        time.sleep(0.05)
    assert seen_not_ready, "/health/ready stayed 200 with a process down"
    assert r.status_code == 200, "the supervisor did not bring the process back"
    pids = [p["pid"] for p in r.json()["processes"]]
    assert victim not in pids and len(set(pids)) == 2
    assert "exited with -9; starting it again" in two.logs()
    assert metric_sum(httpx.get(two.url + "/metrics").text, "imgserve_server_processes") == 2


def test_hot_swap_reaches_every_process(two: LiveServer, trained: Trained) -> None:
    store = two.log.parent / "store"
    clone_version(store, trained.name, trained.version, trained.version + 1)
    new = trained.version + 1

    def everywhere() -> bool:
        r = httpx.get(two.url + "/health/ready", timeout=10)
        return r.status_code == 200 and all(p["models"].get(trained.name) == new for p in r.json()["processes"])

    assert wait_until(everywhere, 90)
    image = clothing_images(1)[0].read_bytes()
    versions = {fresh_post(two.url, image).headers["X-Model-Version"] for _ in range(20)}
    assert versions == {str(new)}
    text = httpx.get(two.url + "/metrics").text
    assert metric_sum(text, "imgserve_model_version_served", model=trained.name) == new
    assert metric_sum(text, "imgserve_model_loads_total", model=trained.name, outcome="success") == 4  # 2 x 2


def test_sigterm_drains_both_processes(trained: Trained, tmp_path: Path, server_processes: int) -> None:
    shutil.copytree(trained.store, tmp_path / "store")
    # rows stay queued (the longest delay, no idle flush, no row run at once on an idle model) in both
    # processes when the signal arrives
    server = start_server(tmp_path / "store", tmp_path, IMGSERVE_MAX_BATCH_DELAY_MS="10000",
                          IMGSERVE_MAX_BATCH_SIZE="64", IMGSERVE_FLUSH_WHEN_IDLE="false",
                          IMGSERVE_INLINE_RUN_MAX_MS="0")
    host, port = server.url.removeprefix("http://").split(":")
    try:
        workers = server.workers()
        image = clothing_images(1)[0].read_bytes()
        # every connection is open before any request is sent, so the 24 requests arrive together
        # (well inside the batch delay), wherever the kernel hands each connection
        conns = [http.client.HTTPConnection(host, int(port), timeout=60) for _ in range(24)]
        for conn in conns:
            conn.connect()

        def post(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
            try:
                conn.request("POST", "/predict", image, {"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(post, conn) for conn in conns]
            # all 24 queued, none answered: what is in the queues when the signal comes is known exactly
            wait_until(lambda: metric_sum(server.metrics(), "imgserve_queue_depth") == 24, 60,
                       "24 rows queued across both processes")
            assert not any(f.done() for f in futures)
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    assert server.proc.wait(60) == 0
    # queued before the signal, in either process: every one answered, none lost
    assert [status for status, _ in answers] == [200] * 24, answers
    assert all(json.loads(body)["predictions"] for _, body in answers)
    assert all(not Path(f"/proc/{p}").exists() for p in workers)
    logs = server.logs()
    for n in (1, 2):
        assert f"[process {n}] service.app: draining" in logs
        assert f"[process {n}] uvicorn.error: Application shutdown complete" in logs
