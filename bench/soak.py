"""Long runs for the reliability scorecard: a soak (memory slope) and an overload (status mix).

    python -m bench.soak --minutes 10 --clients 8                       # soak at ~70% of capacity
    python -m bench.soak --minutes 5 --rate 1.5 --queue-rows 16 --timeout-ms 2000   # overload at 150%

Serves the tiny benchmark CNN and samples its resident memory every 10 s. The soak drives it with
`bench.load` (closed loop, separate process). `--rate X` first measures capacity (wrk, 3/4 of the
queue in clients, 20 s) and then offers X times that many requests per second for the whole run with
h2load (`--client hey` for the older runs), paced by many connections so that it is open loop: the
server, not the client, decides what is refused. Prints/writes one JSON object with the statuses,
latencies of accepted requests, the server's own counts and whether they equal the client's, the
memory slope (least squares, MiB per minute, after the first minute) and where the cores went
(server, load generator, idle) in the capacity phase and the overload.
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
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.harness import DEFAULT_IMAGES, REPO, rss_bytes, service_env
from bench.runs import Server, ensure_model, load

SHARDS = 16
PER_CLIENT_RATE = {"h2load": 0.5, "hey": 1.5}


def open_loop(url: str, image: Path, rate: float, seconds: float, timeout_s: float, client: str = "h2load",
              per_client_rate: float | None = None) -> dict[str, object]:
    """`rate` requests/s for `seconds`, from enough connections that each sends at most `per_client_rate`
    a second with one request in flight, so that the offer stays open loop while answers take less than
    a tick (`answered_per_s` below `offered_per_s` shows by how much they did not).

    - h2load (C, libev, Debian's nghttp2-client; the default) costs about what wrk costs a request, so
      the overload leaves the server the share of the cores the capacity phase left it. A client that
      falls behind its schedule sends what it owes once its answer comes. Each client sends its share
      of `rate * seconds` and waits for the answer (at the end of a -D time h2load would close every
      connection with a request in flight); status and time per request come from `--log-file`.
    - hey (Go) costs about three times as much a request; a worker that falls behind skips ticks.

    One process's clients tick at the same instants, which would offer the load in bursts; so they are
    split over SHARDS processes whose starts are spread evenly over one tick."""
    if not shutil.which(client):
        package = {"h2load": "nghttp2-client"}.get(client, client)
        raise SystemExit(f"the open-loop overload needs `{client}` (apt-get install {package})")
    workers = max(SHARDS, int(rate / (per_client_rate or PER_CLIENT_RATE[client])) + 1)
    per_worker = rate / workers
    tick = 1.0 / per_worker
    each = max(1, round(per_worker * seconds))
    host = url.split("//", 1)[1]
    rows: list[tuple[float, str, float]] = []  # (start s, status, ms)
    errors = {"failed": 0, "errored": 0, "timeout": 0}
    with tempfile.TemporaryDirectory(prefix="open-loop-") as tmp:
        procs = []
        for i in range(SHARDS):
            n = workers // SHARDS + (1 if i < workers % SHARDS else 0)
            time.sleep(tick / SHARDS if i else 0)
            log = Path(tmp) / f"{i}.tsv"
            cmd = (["h2load", "--h1", "-c", str(n), "-t", "1", "--rps", f"{per_worker:.3f}", "-n", str(n * each),
                    "-N", str(int(timeout_s)), "-d", str(image), "-H", "content-type: image/jpeg", "-H",
                    f"host: {host}", "--log-file", str(log), url + "/predict"] if client == "h2load" else
                   ["hey", "-z", f"{int(seconds)}s", "-c", str(n), "-q", f"{per_worker:.3f}", "-m", "POST", "-T",
                    "image/jpeg", "-D", str(image), "-t", str(int(timeout_s)), "-o", "csv", url + "/predict"])
            procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
        for proc, log in procs:
            stdout, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"{client} exited with {proc.returncode}: {stdout[-400:]}")
            if client == "h2load":
                for line in log.read_text().splitlines():
                    start_us, code, us = line.split("\t")[:3]
                    rows.append((int(start_us) / 1e6, code, int(us) / 1e3))
                for key in errors:
                    errors[key] += _h2load_count(stdout, key)
            else:
                body = stdout[stdout.index("response-time"):]  # hey's CSV, after any warnings
                rows += [(float(r["offset"]), r["status-code"], float(r["response-time"]) * 1e3)
                         for r in csv.DictReader(io.StringIO(body))]
    statuses: dict[str, int] = {}
    for _, code, _ in rows:
        statuses[code] = statuses.get(code, 0) + 1
    ok = np.asarray([ms for _, code, ms in rows if code == "200"])
    every = np.asarray([ms for _, _, ms in rows])
    starts = [t for t, _, _ in rows]
    span = (max(starts) - min(starts) if starts else 0.0) or seconds

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if len(a) else None

    return {"tool": f"{client} x{SHARDS}, staggered", "workers": workers, "offered_per_s": rate,
            "answered": len(rows), "answered_per_s": len(rows) / span, "statuses": statuses,
            **({f"client_{k}": v for k, v in errors.items()} if client == "h2load" else {}),
            "ok": len(ok), "images_per_s": len(ok) / span,
            "p50_ms": pct(ok, 50), "p95_ms": pct(ok, 95), "p99_ms": pct(ok, 99),
            "max_ms": float(ok.max()) if len(ok) else None, "p99_all_ms": pct(every, 99)}


def _h2load_count(output: str, word: str) -> int:
    """A figure of h2load's summary line `requests: 10 total, 10 started, 10 done, 9 succeeded, 1 failed, ...`."""
    for line in output.splitlines():
        if line.startswith("requests:"):
            for part in line.split(":", 1)[1].split(","):
                value, _, name = part.strip().partition(" ")
                if name == word:
                    return int(value)
    return 0


def _machine_jiffies() -> tuple[int, int, int]:
    """All, idle (idle plus iowait) and stolen (by the hypervisor, for other guests) jiffies of every
    core so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4], fields[7]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuSplit:
    """Where the machine's cores went between `start()` and `stop()`: the server's processes, the
    load generator's (children of this process, reaped by then), this process, time the hypervisor
    stole for other guests (a shared virtual machine), everything else, and idle; in cores (CPU
    seconds per second of wall time)."""

    def __init__(self, server_cpu: Callable[[], float]) -> None:
        self.server_cpu = server_cpu

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.server0, self.kids0, self.own0 = self.server_cpu(), _children_cpu(), time.process_time()
        self.all0, self.idle0, self.steal0 = _machine_jiffies()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        all1, idle1, steal1 = _machine_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        stolen = (steal1 - self.steal0) / tick / wall
        busy = (all1 - self.all0 - (idle1 - self.idle0)) / tick / wall - stolen
        split = {"seconds": wall, "server_cores": (self.server_cpu() - self.server0) / wall,
                 "client_cores": (_children_cpu() - self.kids0) / wall,
                 "bench_cores": (time.process_time() - self.own0) / wall,
                 "idle_cores": (idle1 - self.idle0) / tick / wall, "stolen_cores": stolen,
                 "cores": os.cpu_count() or 0}
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


def settled_counts(url: str, timeout_s: float = 10.0, pause_s: float = 0.25) -> dict[str, float]:
    """`server_counts` once two reads `pause_s` apart agree: a load generator that stops on a clock
    (wrk) leaves requests in the server that are counted after it returns."""
    def others(counts: dict[str, float]) -> dict[str, float]:  # each read counts itself
        return {k: v for k, v in counts.items() if 'handler="/metrics"' not in k}

    last = server_counts(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(pause_s)
        now = server_counts(url)
        if others(now) == others(last):
            return now
        last = now
    return last


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
    return {k: float(v) for k, v in statuses.items() if v} == served_by_status(counts)


def served_by_status(counts: dict[str, float]) -> dict[str, float]:
    """The server's answers to /predict by status code (as text), from `server_counts` (or a difference of two)."""
    server: dict[str, float] = {}
    for key, value in counts.items():
        if key.startswith("imgserve_http_requests_total{") and 'handler="/predict"' in key and value:
            code = key.split('status="')[1].split('"')[0]
            server[code] = server.get(code, 0.0) + value
    return server


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (soak)")
    p.add_argument("--rate", type=float, help="open loop at this multiple of the measured capacity (overload)")
    p.add_argument("--queue-rows", type=int, default=256)
    p.add_argument("--timeout-ms", type=int, default=30000)
    p.add_argument("--workers", default="1", help="IMGSERVE_WORKERS of the server")
    p.add_argument("--client", choices=("h2load", "hey"), default="h2load", help="open-loop load generator (overload)")
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
            before = settled_counts(server.url)
            image = sorted(args.images.rglob("*.jpg"))[0]
            split.start()
            result_load = open_loop(server.url, image, args.rate * capacity["images_per_s"], args.minutes * 60,
                                    timeout_s=max(10.0, 5 * args.timeout_ms / 1000), client=args.client)
            cpu = split.stop()
        else:
            out = subprocess.run([sys.executable, "-m", "bench.load", "--url", server.url, "--images",
                                  str(args.images), "--clients", str(args.clients), "--duration",
                                  str(args.minutes * 60), "--timeout", "60"], cwd=REPO, env=service_env(),
                                 capture_output=True, text=True, check=True)
            result_load = json.loads(out.stdout.strip().splitlines()[-1])
        after = settled_counts(server.url)
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
