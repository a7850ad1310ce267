"""Long runs for the reliability scorecard: a soak (memory slope) and an overload (status mix).

    python -m bench.soak --minutes 10 --clients 8                       # soak at ~70% of capacity
    python -m bench.soak --minutes 5 --rate 1.5 --queue-rows 16 --timeout-ms 2000   # overload at 150%

Serves the tiny benchmark CNN and samples its resident memory every 10 s. The soak drives it with
`bench.load` (closed loop, separate process). `--rate X` first measures capacity (wrk, 64 clients,
20 s) and then offers X times that many requests per second for the whole run with `hey` (Go, from
Debian), paced by many workers so that it is open loop in practice: the server, not the client,
decides what is refused. Prints/writes one JSON object with the statuses, latencies of accepted
requests, the server's own counts, the memory slope (least squares, MiB per minute, after the
first minute) and, for the overload, where the cores went during it (server, hey, idle).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.harness import DEFAULT_IMAGES, REPO, rss_bytes, service_env
from bench.runs import Server, ensure_model, load


def open_loop(url: str, image: Path, rate: float, seconds: float, timeout_s: float) -> dict[str, object]:
    """`rate` requests/s for `seconds` with hey: enough workers that each sends at most 1.5/s, so a
    worker falls behind its schedule only if an answer takes longer than 667 ms (`answered_per_s`
    below `offered_per_s` shows by how much it did). One hey's workers all tick at the same instants,
    which would offer the load in bursts of every worker at once; so the workers are split over
    SHARDS hey processes whose start times are spread evenly over one tick."""
    if not shutil.which("hey"):
        raise SystemExit("the open-loop overload needs `hey` (apt-get install hey)")
    workers = max(SHARDS, int(rate / 1.5) + 1)
    per_worker = rate / workers
    tick = 1.0 / per_worker
    procs = []
    for i in range(SHARDS):
        n = workers // SHARDS + (1 if i < workers % SHARDS else 0)
        time.sleep(tick / SHARDS if i else 0)
        procs.append(subprocess.Popen(
            ["hey", "-z", f"{int(seconds)}s", "-c", str(n), "-q", f"{per_worker:.3f}", "-m", "POST",
             "-T", "image/jpeg", "-D", str(image), "-t", str(int(timeout_s)), "-o", "csv", url + "/predict"],
            stdout=subprocess.PIPE, text=True))
    rows = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"hey exited with {proc.returncode}")
        rows += list(csv.DictReader(io.StringIO(stdout)))
    statuses: dict[str, int] = {}
    ok_ms: list[float] = []
    all_ms: list[float] = []
    for r in rows:
        code = r["status-code"]
        statuses[code] = statuses.get(code, 0) + 1
        ms = float(r["response-time"]) * 1e3
        all_ms.append(ms)
        if code == "200":
            ok_ms.append(ms)
    span = max((float(r["offset"]) for r in rows), default=seconds)
    lat = np.asarray(ok_ms)
    return {"tool": f"hey x{SHARDS}, staggered", "workers": workers, "offered_per_s": rate, "answered": len(rows),
            "answered_per_s": len(rows) / span if span else 0.0, "statuses": statuses,
            "ok": len(ok_ms), "images_per_s": len(ok_ms) / span if span else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None,
            "p99_all_ms": float(np.percentile(all_ms, 99)) if all_ms else None}


SHARDS = 16


def _machine_jiffies() -> tuple[int, int]:
    """All and idle (idle plus iowait) jiffies of every core so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuSplit:
    """Where the machine's cores went between `start()` and `stop()`: the server's processes, the
    load generator's (children of this process, reaped by then), this process, everything else, and
    idle; in cores (CPU seconds per second of wall time)."""

    def __init__(self, server_cpu: Callable[[], float]) -> None:
        self.server_cpu = server_cpu

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.server0, self.kids0, self.own0 = self.server_cpu(), _children_cpu(), time.process_time()
        self.all0, self.idle0 = _machine_jiffies()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        all1, idle1 = _machine_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        busy = (all1 - self.all0 - (idle1 - self.idle0)) / tick / wall
        split = {"seconds": wall, "server_cores": (self.server_cpu() - self.server0) / wall,
                 "client_cores": (_children_cpu() - self.kids0) / wall,
                 "bench_cores": (time.process_time() - self.own0) / wall,
                 "idle_cores": (idle1 - self.idle0) / tick / wall, "cores": os.cpu_count() or 0}
        split["other_cores"] = busy - split["server_cores"] - split["client_cores"] - split["bench_cores"]
        return split


def server_counts(url: str) -> dict[str, float]:
    """Requests by status, rejections by reason and images decoded, from the service's own /metrics,
    keyed by series."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in ("imgserve_http_requests_total", "imgserve_rejections_total",
                               "imgserve_dropped_rows_total", "imgserve_decode_seconds_count"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                key = f"{sample.name}{{{labels}}}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _memory(samples: list[tuple[float, int]]) -> tuple[float | None, float | None, float | None, float | None]:
    """(slope MiB/min by least squares after the first minute, first, last, max MiB)."""
    xs = np.array([s for s, _ in samples if s >= 60]) / 60
    ys = np.array([r for s, r in samples if s >= 60]) / 2**20
    if not len(ys):
        return None, None, None, None
    slope = float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 3 else None
    return slope, float(ys[0]), float(ys[-1]), float(ys.max())


def _counts_match(load: dict[str, object], counts: dict[str, float]) -> bool | None:
    """Did the server count, by status, exactly the answers the client got? (None: not comparable)"""
    statuses = load.get("statuses")
    if not isinstance(statuses, dict):
        return None
    server: dict[str, float] = {}
    for key, value in counts.items():
        if key.startswith("imgserve_http_requests_total{") and 'handler="/predict"' in key and value:
            code = key.split('status="')[1].split('"')[0]
            server[code] = server.get(code, 0.0) + value
    return {k: float(v) for k, v in statuses.items() if v} == server


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (soak)")
    p.add_argument("--rate", type=float, help="open loop at this multiple of the measured capacity (overload)")
    p.add_argument("--queue-rows", type=int, default=256)
    p.add_argument("--timeout-ms", type=int, default=30000)
    p.add_argument("--workers", default="1", help="IMGSERVE_WORKERS of the server")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--store", type=Path, default=REPO / "bench" / ".store")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    ensure_model(args.store, "cnn")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    server = Server(args.store, "bench-cnn", args.out / f"{stamp}-soak-server.log",
                    IMGSERVE_MAX_QUEUE_ROWS=str(args.queue_rows), IMGSERVE_REQUEST_TIMEOUT_MS=str(args.timeout_ms),
                    IMGSERVE_WORKERS=args.workers)
    samples: list[tuple[float, int]] = []
    per_process: dict[int, list[tuple[float, int]]] = {pid: [] for pid in server.workers()}
    done = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not done.wait(10):
            at = time.monotonic() - start
            samples.append((at, server.rss()))
            for pid, series in per_process.items():
                series.append((at, rss_bytes(pid)))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    capacity = None
    cpu: dict[str, float] | None = None
    split = CpuSplit(server.cpu_seconds)
    before: dict[str, float] = {}
    try:
        if args.rate:
            # capacity: as many clients as the server takes in at once (3/4 of the queue in every process,
            # so that uneven connection spreading refuses none); refusals would make it look smaller
            clients = max(4, args.queue_rows * len(per_process) * 3 // 4)
            split.start()
            capacity = load(server, args.images, clients, 20, "wrk")
            capacity["cpu"] = split.stop()
            before = server_counts(server.url)
            image = sorted(args.images.rglob("*.jpg"))[0]
            split.start()
            result_load = open_loop(server.url, image, args.rate * capacity["images_per_s"], args.minutes * 60,
                                    timeout_s=max(10.0, 5 * args.timeout_ms / 1000))
            cpu = split.stop()
        else:
            out = subprocess.run([sys.executable, "-m", "bench.load", "--url", server.url, "--images",
                                  str(args.images), "--clients", str(args.clients), "--duration",
                                  str(args.minutes * 60), "--timeout", "60"], cwd=REPO, env=service_env(),
                                 capture_output=True, text=True, check=True)
            result_load = json.loads(out.stdout.strip().splitlines()[-1])
        after = server_counts(server.url)
    finally:
        done.set()
        server.stop()
    slope, first, last, peak = _memory(samples)
    counts = {k: v - before.get(k, 0.0) for k, v in after.items()}
    result = {"started": stamp, "command": " ".join(["python -m bench.soak", *sys.argv[1:]]), "load": result_load,
              "capacity": capacity, "cpu": cpu, "server_counts": counts,
              "counts_match": _counts_match(result_load, counts),
              "workers": args.workers, "processes": len(per_process),
              "rss_after_warmup_mib": server.rss_after_warmup / 2**20,
              "rss_first_mib": first, "rss_last_mib": last, "rss_max_mib": peak, "rss_slope_mib_per_min": slope,
              "per_process": {str(pid): dict(zip(("slope_mib_per_min", "first_mib", "last_mib", "max_mib"),
                                                 _memory(series), strict=True))
                              for pid, series in per_process.items()},
              "samples": samples}
    (args.out / f"{stamp}-soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
