"""A batch of one, as a lone client meets it: back to back, and after a 2-ms pause (the time the event
loop spends on HTTP and decoding between two requests), per runtime, in a fresh process each.

    python -m bench.lone VERSION_DIR [--threads 1] [--runtimes tensorflow-fp32,openvino-fp32]

After a pause a runtime's worker threads have gone to sleep and its caches are cold, and for a small
model that wake-up, not the arithmetic, is most of a lone request's model time. `openvino-fp32`
without that variant is the SavedModel converted as the service does at load. Writes
bench/results/<stamp>-lone.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import REPO, service_env

PAUSES = {"back to back": None, "after a 2-ms busy pause": ("busy", 0.002), "after a 2-ms sleep": ("sleep", 0.002)}


def measure(version_dir: Path, key: str, threads: int, calls: int) -> dict[str, float]:
    """p50 ms of `predict` on one row, for each kind of pause (in this process)."""
    from bench.limit import runtime_for

    runtime: Any = runtime_for(version_dir, key, threads)[0]
    meta = runtime.meta
    row = np.random.default_rng(0).integers(0, 256, (1, meta.input.height, meta.input.width, 3), dtype=np.uint8)
    for _ in range(50):
        runtime.predict(row)
    out = {}
    for name, pause in PAUSES.items():
        times = []
        for _ in range(calls):
            if pause is not None and pause[0] == "busy":
                end = time.perf_counter() + pause[1]
                while time.perf_counter() < end:
                    pass
            elif pause is not None:
                time.sleep(pause[1])
            t = time.perf_counter()
            runtime.predict(row)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("version_dir", type=Path)
    p.add_argument("--threads", type=int, default=1, help="threads of one call (1: a process's share with 2 on 2 "
                   "cores; 0: the runtime decides)")
    p.add_argument("--runtimes", default="tensorflow-fp32,openvino-fp32")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per runtime, alternating")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this runtime here, print JSON
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.version_dir, args.one, args.threads, args.calls)))
        return 0
    keys = args.runtimes.split(",")
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in keys}
    for _ in range(args.rounds):
        for key in keys:
            done = subprocess.run([sys.executable, "-m", "bench.lone", str(args.version_dir), "--one", key,
                                   "--threads", str(args.threads), "--calls", str(args.calls)], cwd=REPO,
                                  env=service_env(), check=True, capture_output=True, text=True)
            rounds[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {k: {name: statistics.median(r[name] for r in rs) for name in PAUSES} for k, rs in rounds.items()}
    for key, m in medians.items():
        print(f"{key:18s} " + "  ".join(f"{name}: {ms:.3f} ms" for name, ms in m.items()))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}-lone.json").write_text(json.dumps(
        {"started": stamp, "command": " ".join(["python -m bench.lone", *sys.argv[1:]]),
         "version_dir": str(args.version_dir), "threads": args.threads, "rounds": rounds, "median_ms": medians},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
