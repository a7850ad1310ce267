"""bench.soak: its account of where the cores went during an overload, and its open-loop load generators."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.harness import cpu_seconds
from bench.soak import CpuSplit, _h2load_count, open_loop, settled_counts
from tests.support import LiveServer, clothing_images, wait_until


def test_cpu_split_tells_server_from_client() -> None:
    """A spinning 'server' (not reaped) counts as the server's, a spinning child that exits and is
    reaped counts as the client's, and the parts plus idle add up to the machine's cores."""
    # CPU time, not wall time, bounds the spinning: on a loaded machine each still spends what it says
    spin = [sys.executable, "-c", "import time\nwhile time.process_time() < 0.8: pass"]
    server = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: pass"])
    try:
        split = CpuSplit(lambda: cpu_seconds(server.pid))
        split.start()
        subprocess.run(spin, check=True)  # the "load generator", reaped before stop()
        wait_until(lambda: cpu_seconds(server.pid) > 0.3, 60, "the server to spin")
        out = split.stop()
    finally:
        server.kill()
        server.wait()
    assert out["client_cores"] * out["seconds"] >= 0.7, out  # the reaped child's 0.8 s, counted to the client
    assert out["server_cores"] * out["seconds"] >= 0.25, out
    assert out["stolen_cores"] >= 0, out
    total = sum(out[k] for k in ("server_cores", "client_cores", "bench_cores", "other_cores", "idle_cores",
                                 "stolen_cores"))
    assert abs(total - out["cores"]) < 0.25 * out["cores"], out


@pytest.mark.slow
@pytest.mark.parametrize("client", ["h2load", "hey"])
def test_open_loop_offers_the_rate_and_reads_every_answer(live: LiveServer, client: str) -> None:
    """Both load generators, against a real server: the rate offered is the rate answered (well under
    capacity nobody falls behind), every answer is read back with its status and time, and the server
    counted as many requests as the client reports."""
    image = clothing_images(1)[0]
    before = live.metric("imgserve_http_requests_total", handler="/predict")
    result = open_loop(live.url, image, rate=40, seconds=4, timeout_s=10, client=client)
    served = live.metric("imgserve_http_requests_total", handler="/predict") - before
    assert result["statuses"] == {"200": result["answered"]}, result
    assert served == result["answered"], (served, result)
    assert result["p50_ms"] is not None and result["p50_ms"] > 0, result  # type: ignore[operator]
    # (the rate kept is measured by bench.soak; on a loaded machine the client itself may fall behind)
    if client == "h2load":  # a count per connection: exactly that many were sent and answered
        each = max(1, round(40 / result["workers"] * 4))  # type: ignore[operator]
        assert result["answered"] == result["workers"] * each, result  # type: ignore[operator]
        assert result["client_errored"] == result["client_timeout"] == 0, result


def test_h2load_summary_is_read() -> None:
    out = ("finished in 3.00s, 52.00 req/s, 34.96KB/s\n"
           "requests: 260 total, 260 started, 258 done, 250 succeeded, 8 failed, 2 errored, 1 timeout\n"
           "status codes: 250 2xx, 0 3xx, 8 4xx, 0 5xx\n")
    assert [_h2load_count(out, k) for k in ("done", "failed", "errored", "timeout", "missing")] == [258, 8, 2, 1, 0]


def test_settled_counts_waits_for_requests_still_in_the_server() -> None:
    """A server still finishing requests (its /predict count rises on the first reads) is read again until
    two reads agree; its count of /metrics scrapes, which every read moves, does not hold that up."""
    reads = []

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            reads.append(1)
            done = min(len(reads), 4)  # 1, 2, 3, 4, 4, ...
            body = (f'imgserve_http_requests_total{{handler="/predict",method="POST",status="200"}} {done}\n'
                    f'imgserve_http_requests_total{{handler="/metrics",method="GET",status="200"}} {len(reads)}\n')
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        counts = settled_counts(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=10, pause_s=0.01)
    finally:
        server.shutdown()
        server.server_close()
    key = 'imgserve_http_requests_total{handler="/predict",method="POST",status="200"}'
    assert counts[key] == 4, counts
    assert len(reads) == 5, reads  # 4 rising reads, then one that agrees
