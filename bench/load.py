"""Closed-loop load generator, run in its own process: N clients, each posting the next image as soon
as its previous answer arrives, for a warm-up and then a fixed time. Prints one JSON object.

    python -m bench.load --url http://127.0.0.1:8000 --images DIR --clients 4 --duration 20 --warmup 5

Throughput is measured in steady state, after the warm-up. With large batches answers arrive in
bursts (one per batch), so a count over a fixed window is off by up to one batch and a count over the
whole run also pays for the start and the unfinished tail. Answers closer than 20 ms together are
taken as one burst; the rate is the answers of whole bursts between the end of the first burst and the
end of the last one in the window, over that time. Without distinct bursts (small, frequent batches)
it is the plain count over the window.
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
              timeout_s: float, warmup_s: float = 0.0) -> dict[str, object]:
    done: list[tuple[float, float]] = []  # (answered at, latency) of every 200
    statuses: dict[str, int] = {}
    errors: list[str] = []
    begin = time.perf_counter()
    window_start = begin + warmup_s
    stop_at = window_start + duration_s
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
                    now = time.perf_counter()
                    if now < window_start:
                        continue
                    statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                    if r.status_code == 200:
                        done.append((now, now - t))
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)

        await asyncio.gather(*(worker(i) for i in range(clients)))
    lat = np.asarray([d[1] for d in done]) * 1e3
    ok = len(done)
    answered, span = steady_rate([d[0] for d in done], window_start, stop_at)
    return {
        "tool": "python-httpx",
        "clients": clients,
        "warmup_s": warmup_s,
        "duration_s": span,
        "requests": sum(statuses.values()) + len(errors),
        "ok": ok,
        "statuses": statuses,
        "errors": len(errors),
        "error_kinds": {k: errors.count(k) for k in sorted(set(errors))},
        "images_per_s": answered / span if span else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p95_ms": float(np.percentile(lat, 95)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
    }


def steady_rate(times: list[float], start: float, end: float, gap_s: float = 0.020) -> tuple[int, float]:
    """(answers, seconds) to divide for the steady-state rate; see the module docstring."""
    times = sorted(times)
    bursts: list[list[float]] = []
    for t in times:
        if bursts and t - bursts[-1][-1] < gap_s:
            bursts[-1].append(t)
        else:
            bursts.append([t])
    whole = [b for b in bursts if b[-1] <= end]
    if len(whole) >= 3 and len(whole) < len(times) / 2:
        return sum(len(b) for b in whole[1:]), whole[-1][-1] - whole[0][-1]
    return sum(1 for t in times if start <= t <= end), end - start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of load before measuring")
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--limit-images", type=int, default=64)
    args = p.parse_args()
    files = sorted(args.images.rglob("*.jpg"))[: args.limit_images]
    if not files:
        print(f"no .jpg under {args.images}", file=sys.stderr)
        return 2
    images = [f.read_bytes() for f in files]
    result = asyncio.run(run(args.url, images, args.clients, args.duration, args.max_requests, args.timeout,
                             args.warmup))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
