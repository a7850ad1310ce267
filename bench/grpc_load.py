"""Closed-loop gRPC load generators: N clients, each sending the next image as a KServe v2 ModelInfer (one
BYTES element) as soon as its previous answer arrives, for a warm-up and then a fixed time.

- `run` (asyncio, `grpc.aio`, in its own process; `python -m bench.grpc_load`): a Python client as a
  user's service would write it.
- `h2load_grpc`: h2load (C, Debian's nghttp2-client) sending the same framed gRPC message over HTTP/2,
  the gRPC counterpart of wrk: each generator shares the machine with the server, so a Python client's
  own cost would count against gRPC in a comparison with wrk. h2load sees HTTP statuses only (gRPC puts
  its status in trailers): the caller checks the server's count of answers by gRPC status code.

Each reports its own CPU time per answer (its cost is part of what the figures include).

    python -m bench.grpc_load --target 127.0.0.1:8001 --model bench-cnn --images DIR --clients 8 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load import steady_rate
from service.rpc import protos


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def infer_request(model: str, image: bytes) -> bytes:
    """A serialised ModelInferRequest holding one encoded image as a BYTES element."""
    req_cls = protos.methods(protos.KSERVE)["ModelInfer"][0]
    req = req_cls(model_name=model)
    req.inputs.add(name="images", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
    return req.SerializeToString()  # type: ignore[no-any-return]


def h2load_grpc(target: str, model: str, image: bytes, clients: int, duration_s: float,
                warmup_s: float, metadata: tuple[str, ...] = ()) -> dict[str, object]:
    """h2load as a closed-loop gRPC client: `clients` HTTP/2 connections with one call in flight each, one
    native thread (as cheap a client as wrk), a warm-up, then `duration_s` measured. Status and time per
    call come from `--log-file`; `http_ok` counts HTTP 200s, which include calls that gRPC failed. At the
    end of its time h2load closes the connections with a call in flight: the server counts those calls
    CANCELLED (at most one a client). `metadata`: more headers, `name: value` (an API key)."""
    if not shutil.which("h2load"):
        raise SystemExit("the gRPC h2load generator needs `h2load` (apt-get install nghttp2-client)")
    message = infer_request(model, image)
    with tempfile.TemporaryDirectory(prefix="grpc-h2load-") as tmp:
        body, log = Path(tmp) / "body", Path(tmp) / "log.tsv"
        body.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)  # gRPC framing: uncompressed, length
        cmd = ["h2load", "-c", str(clients), "-m", "1", "-t", "1", "-D", f"{int(duration_s)}s",
               "--warm-up-time", f"{int(warmup_s)}s", "-d", str(body), "-H", "content-type: application/grpc",
               "-H", "te: trailers", *(arg for h in metadata for arg in ("-H", h)), "--log-file", str(log),
               f"http://{target}/{protos.KSERVE}/ModelInfer"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(cmd, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode:
            raise RuntimeError(f"h2load exited with {out.returncode}: {out.stdout[-400:]}{out.stderr[-400:]}")
        rows = [line.split("\t")[:3] for line in log.read_text().splitlines()]
    statuses: dict[str, int] = {}
    for _, code, _ in rows:
        statuses[code] = statuses.get(code, 0) + 1
    lat = np.asarray([int(us) / 1e3 for _, code, us in rows if code == "200"])
    ok = len(lat)  # the log holds the measured window's calls: h2load logs none during its warm-up
    return {
        "tool": "h2load-grpc", "clients": clients, "warmup_s": warmup_s, "duration_s": duration_s,
        "http_ok": ok, "statuses": statuses, "errors": len(rows) - ok, "images_per_s": ok / duration_s,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p95_ms": float(np.percentile(lat, 95)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
        "client_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),  # warm-up too
    }


async def run(target: str, model: str, images: list[bytes], clients: int, duration_s: float,
              warmup_s: float, channels: int, stream: bool = False) -> dict[str, object]:
    """With `stream`, each client opens one ModelStreamInfer stream and sends its next request on it once
    the previous answer has come (Triton's streaming clients), instead of a ModelInfer call per image."""
    infer_resp = protos.methods(protos.KSERVE)["ModelInfer"][1]
    stream_resp = protos.methods(protos.KSERVE)["ModelStreamInfer"][1]
    bodies = [infer_request(model, image) for image in images]
    done: list[tuple[float, float]] = []
    codes: dict[str, int] = {}
    begin = time.perf_counter()
    window_start, stop_at = begin + warmup_s, begin + warmup_s + duration_s
    pool = [grpc.aio.insecure_channel(target) for _ in range(max(1, min(channels, clients)))]
    calls = [ch.unary_unary(f"/{protos.KSERVE}/ModelInfer") for ch in pool]  # bytes in, bytes out
    streams = [ch.stream_stream(f"/{protos.KSERVE}/ModelStreamInfer") for ch in pool]
    cpu0 = 0.0

    def new_stream(i: int) -> Any:
        return streams[i % len(pool)](timeout=warmup_s + duration_s + 120)

    async def worker(i: int) -> None:
        nonlocal cpu0
        n = i
        open_stream = new_stream(i) if stream else None
        while time.perf_counter() < stop_at:
            body = bodies[n % len(bodies)]
            n += clients
            t = time.perf_counter()
            try:
                if open_stream is None:
                    answer = infer_resp.FromString(await calls[i % len(pool)](body, timeout=120))
                    code = "OK"
                else:
                    await open_stream.write(body)
                    raw = await open_stream.read()
                    if raw is grpc.aio.EOF:
                        raise RuntimeError("the server ended the stream")
                    message = stream_resp.FromString(raw)
                    answer, code = message.infer_response, "STREAM_ERROR" if message.error_message else "OK"
            except grpc.aio.AioRpcError as exc:
                answer, code = None, exc.code().name
                if open_stream is not None:
                    open_stream = new_stream(i)
            now = time.perf_counter()
            if now < window_start:
                continue
            if not cpu0:
                cpu0 = cpu_s()
            codes[code] = codes.get(code, 0) + 1
            if code == "OK":
                assert answer is not None and answer.outputs, "an answer without outputs"
                done.append((now, now - t))
        if open_stream is not None:
            await open_stream.done_writing()

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
        "tool": "python-grpc-aio-stream" if stream else "python-grpc-aio", "clients": clients,
        "channels": len(pool), "warmup_s": warmup_s,
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
    p.add_argument("--stream", action="store_true", help="one ModelStreamInfer stream a client")
    args = p.parse_args()
    files = sorted(args.images.rglob("*.jpg"))[: args.limit_images]
    if not files:
        print(f"no .jpg under {args.images}", file=sys.stderr)
        return 2
    result = asyncio.run(run(args.target, args.model, [f.read_bytes() for f in files], args.clients,
                             args.duration, args.warmup, args.channels, args.stream))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
