"""Server CPU time per request: the service's processes' user+system time (from /proc) over the
requests answered in a fixed window, with raw `image/jpeg` bodies and with multipart uploads.

    python -m bench.cpu --store /tmp/peers-store-tiny --model tiny-64 --clients 32 --duration 20

The load comes from wrk (compiled, a separate process; its CPU is not counted). The figure is a
property of the server's code path, so it can be compared before and after a change on one machine
even while the absolute throughput moves with the noise of a shared host.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.harness import DEFAULT_IMAGES, REPO
from bench.runs import WARMUP_S, Server, wrk


def measure(server: Server, image: Path, clients: int, seconds: float, multipart: bool) -> dict[str, object]:
    wrk(server.url, image, clients, WARMUP_S, multipart)
    before = server.cpu_seconds()
    res = wrk(server.url, image, clients, seconds, multipart)
    spent = server.cpu_seconds() - before
    ok = int(res["ok"])
    return {**res, "server_cpu_s": spent, "cpu_ms_per_request": spent / ok * 1e3 if ok else None,
            "server_cores_busy": spent / res["duration_s"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--workers", default="1", help="IMGSERVE_WORKERS of the server")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    image = sorted(args.images.rglob("*.jpg"))[0]
    server = Server(args.store, args.model, args.out / f"{stamp}-cpu-server.log", IMGSERVE_WORKERS=args.workers,
                    IMGSERVE_LOG_LEVEL="WARNING")
    try:
        runs = [measure(server, image, args.clients, args.duration, m) for m in (False, True)]
    finally:
        server.stop()
    result = {"started": stamp, "command": " ".join(["python -m bench.cpu", *sys.argv[1:]]),
              "workers": args.workers, "image": str(image), "runs": runs}
    (args.out / f"{stamp}-cpu.json").write_text(json.dumps(result, indent=2))
    for r in runs:
        print(f"{r['body']:>9}: {r['cpu_ms_per_request']:.3f} ms server CPU per request, "
              f"{r['images_per_s']:.0f} images/s, p50 {r['p50_ms']:.1f} ms, {r['server_cores_busy']:.2f} cores busy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
