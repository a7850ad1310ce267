"""Long runs for the reliability scorecard: a soak (memory slope) and an overload (status mix).

    python -m bench.soak --minutes 10 --clients 8                       # soak at ~70% of capacity
    python -m bench.soak --minutes 5 --clients 96 --queue-rows 16 --timeout-ms 2000   # overload

Serves the tiny benchmark CNN, drives it with `bench.load` (closed loop, separate process), samples
the server's resident memory every 10 s, and prints/writes one JSON object with the statuses,
latencies and the memory slope (least squares, MiB per minute, after the first minute).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.__main__ import DEFAULT_IMAGES, REPO, Server, _env, ensure_model, rss_bytes


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queue-rows", type=int, default=256)
    p.add_argument("--timeout-ms", type=int, default=30000)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--store", type=Path, default=REPO / "bench" / ".store")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    ensure_model(args.store, "cnn")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    server = Server(args.store, "bench-cnn", args.out / f"{stamp}-soak-server.log",
                    IMGSERVE_MAX_QUEUE_ROWS=str(args.queue_rows), IMGSERVE_REQUEST_TIMEOUT_MS=str(args.timeout_ms))
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not done.wait(10):
            samples.append((time.monotonic() - start, rss_bytes(server.proc.pid)))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = subprocess.run([sys.executable, "-m", "bench.load", "--url", server.url, "--images", str(args.images),
                              "--clients", str(args.clients), "--duration", str(args.minutes * 60),
                              "--timeout", "60"], cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
        load = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        done.set()
        server.stop()
    xs = np.array([s for s, _ in samples if s >= 60]) / 60
    ys = np.array([r for s, r in samples if s >= 60]) / 2**20
    slope = float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 3 else None
    result = {"started": stamp, "command": " ".join(["python -m bench.soak", *sys.argv[1:]]), "load": load,
              "rss_after_warmup_mib": server.rss_after_warmup / 2**20,
              "rss_first_mib": float(ys[0]) if len(ys) else None, "rss_last_mib": float(ys[-1]) if len(ys) else None,
              "rss_max_mib": float(ys.max()) if len(ys) else None, "rss_slope_mib_per_min": slope,
              "samples": samples}
    (args.out / f"{stamp}-soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
