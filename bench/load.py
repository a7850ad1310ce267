"""Closed-loop load generator, run in its own process: N clients, each posting the next image as soon
as its previous answer arrives, for a fixed time. Prints one JSON object.

    python -m bench.load --url http://127.0.0.1:8000 --images DIR --clients 4 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np


async def run(url: str, images: list[bytes], clients: int, duration_s: float, max_requests: int,
              timeout_s: float) -> dict[str, object]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    stop_at = time.perf_counter() + duration_s
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker(i: int) -> None:
            nonlocal sent
            n = i
            while time.perf_counter() < stop_at and sent < max_requests:
                sent += 1
                body = images[n % len(images)]
                n += clients
                t = time.perf_counter()
                try:
                    r = await client.post("/predict", content=body, headers={"Content-Type": "image/jpeg"})
                    statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    ok = len(latencies)
    return {
        "tool": "python-httpx",
        "clients": clients,
        "duration_s": elapsed,
        "requests": sum(statuses.values()) + len(errors),
        "ok": ok,
        "statuses": statuses,
        "errors": len(errors),
        "error_kinds": {k: errors.count(k) for k in sorted(set(errors))},
        "images_per_s": ok / elapsed if elapsed else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p95_ms": float(np.percentile(lat, 95)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--limit-images", type=int, default=64)
    args = p.parse_args()
    files = sorted(args.images.rglob("*.jpg"))[: args.limit_images]
    if not files:
        print(f"no .jpg under {args.images}", file=sys.stderr)
        return 2
    images = [f.read_bytes() for f in files]
    result = asyncio.run(run(args.url, images, args.clients, args.duration, args.max_requests, args.timeout))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
