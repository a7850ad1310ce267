"""Closed-loop gRPC load generator (asyncio, `grpc.aio`), run in its own process: N clients, each sending
the next image as a KServe v2 ModelInfer (one BYTES element) as soon as its previous answer arrives, for
a warm-up and then a fixed time. Prints one JSON object, with the generator's own CPU time per answer
(it shares the machine with the server: its cost is part of what the figures include).

    python -m bench.grpc_load --target 127.0.0.1:8001 --model bench-cnn --images DIR --clients 8 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from bench.load import steady_rate
from service.rpc import protos


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(target: str, model: str, images: list[bytes], clients: int, duration_s: float,
              warmup_s: float, channels: int) -> dict[str, object]:
    req_cls, resp_cls, *_ = protos.methods(protos.KSERVE)["ModelInfer"]
    bodies = []
    for image in images:
        req = req_cls(model_name=model)
        req.inputs.add(name="images", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
        bodies.append(req.SerializeToString())
    done: list[tuple[float, float]] = []
    codes: dict[str, int] = {}
    begin = time.perf_counter()
    window_start, stop_at = begin + warmup_s, begin + warmup_s + duration_s
    pool = [grpc.aio.insecure_channel(target) for _ in range(max(1, min(channels, clients)))]
    calls = [ch.unary_unary(f"/{protos.KSERVE}/ModelInfer") for ch in pool]  # bytes in, bytes out
    cpu0 = 0.0

    async def worker(i: int) -> None:
        nonlocal cpu0
        call, n = calls[i % len(calls)], i
        while time.perf_counter() < stop_at:
            body = bodies[n % len(bodies)]
            n += clients
            t = time.perf_counter()
            try:
                raw = await call(body, timeout=120)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                raw, code = b"", exc.code().name
            now = time.perf_counter()
            if now < window_start:
                continue
            if not cpu0:
                cpu0 = cpu_s()
            codes[code] = codes.get(code, 0) + 1
            if code == "OK":
                assert resp_cls.FromString(raw).outputs, "an answer without outputs"
                done.append((now, now - t))

    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        for ch in pool:
            await ch.close()
    client_cpu = cpu_s() - cpu0
    lat = np.asarray([d[1] for d in done]) * 1e3
    ok = len(done)
    answered, span = steady_rate([d[0] for d in done], window_start, stop_at)
    return {
        "tool": "python-grpc-aio", "clients": clients, "channels": len(pool), "warmup_s": warmup_s,
        "duration_s": span, "ok": ok, "codes": codes, "errors": sum(v for k, v in codes.items() if k != "OK"),
        "images_per_s": answered / span if span else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p95_ms": float(np.percentile(lat, 95)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
        "client_cpu_ms_per_answer": client_cpu / ok * 1e3 if ok else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="host:port of the gRPC server")
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--channels", type=int, default=4, help="HTTP/2 connections the clients share")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--limit-images", type=int, default=64)
    args = p.parse_args()
    files = sorted(args.images.rglob("*.jpg"))[: args.limit_images]
    if not files:
        print(f"no .jpg under {args.images}", file=sys.stderr)
        return 2
    result = asyncio.run(run(args.target, args.model, [f.read_bytes() for f in files], args.clients,
                             args.duration, args.warmup, args.channels))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
