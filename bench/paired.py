"""The service against the in-process limit (or against itself with batching off), paired and
repeated, for a shared, noisy machine.

    python -m bench.paired --model vgg16 --clients 32 --rounds 3
    python -m bench.paired --model cnn --clients 16 --against batching-off

Each round measures the in-process rate at a few batch sizes (one caller, and two at once), or the
same service with `IMGSERVE_MAX_BATCH_SIZE=1` (a second server, idle meanwhile), and then the service
at `--clients` for `--duration` seconds, back to back, so both see the same neighbours; the ratio of
each round is the service over that round's reference. Reports every round and the median ratio;
writes bench/results/<stamp>-paired.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.harness import DEFAULT_IMAGES, REPO
from bench.runs import MODELS, Server, ensure_model, in_process, load, pick_tool, served_runtime


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), default="vgg16")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--sizes", default="8,16,32", help="in-process batch sizes measured each round")
    p.add_argument("--against", choices=("limit", "batching-off"), default="limit")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    store = REPO / "bench" / ".store"
    vdir = ensure_model(store, args.model)
    _, _, _, _, auto_tool, in_flight = MODELS[args.model]
    sizes = [int(x) for x in args.sizes.split(",")]
    settings = {"IMGSERVE_MAX_BATCH_SIZE": "32", "IMGSERVE_MAX_BATCH_DELAY_MS": "5.0",
                "IMGSERVE_BATCHES_IN_FLIGHT": str(in_flight)}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    tool = pick_tool("auto", auto_tool, args.clients)
    server = Server(store, f"bench-{args.model}", args.out / f"{stamp}-paired-server.log", **settings)
    off = None
    rounds = []
    try:
        runtime = served_runtime(server, f"bench-{args.model}")  # the limit is measured with the same runtime
        print(f"the service runs bench-{args.model} with {runtime}", flush=True)
        if args.against == "batching-off":
            off = Server(store, f"bench-{args.model}", args.out / f"{stamp}-paired-off.log",
                         **{**settings, "IMGSERVE_MAX_BATCH_SIZE": "1", "IMGSERVE_MAX_BATCH_DELAY_MS": "0"})
        for i in range(args.rounds):
            if off is not None:
                ref = load(off, args.images, args.clients, args.duration, tool)
                what = "batching off"
            else:
                ref = in_process(vdir, args.images, max(sizes), 3, sizes, runtime=runtime)
                ref["images_per_s"] = ref["best_images_per_s"]
                what = (f"in-process best (batch {ref['best_batch_size']}, {ref['best_callers']} "
                        f"caller(s))")
            service = load(server, args.images, args.clients, args.duration, tool)
            ratio = service["images_per_s"] / ref["images_per_s"]
            rounds.append({"reference": ref, "service": service, "ratio": ratio})
            print(f"round {i + 1}: service {service['images_per_s']:.2f}/s (p50 {service['p50_ms']:.1f} ms, "
                  f"p99 {service['p99_ms']:.1f} ms), {what} {ref['images_per_s']:.2f}/s, ratio {ratio:.3f}",
                  flush=True)
    finally:
        server.stop()
        if off is not None:
            off.stop()
    ratios = [r["ratio"] for r in rounds]
    result = {"started": stamp, "command": " ".join(["python -m bench.paired", *sys.argv[1:]]),
              "model": args.model, "runtime": runtime, "clients": args.clients, "against": args.against, "tool": tool,
              "settings": settings, "rounds": rounds,
              "ratios": ratios, "median_ratio": statistics.median(ratios)}
    (args.out / f"{stamp}-paired.json").write_text(json.dumps(result, indent=2))
    print(f"median ratio over {len(ratios)} rounds: {result['median_ratio']:.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
