"""What each protocol's server costs per call with no model behind it: the floor under this service's REST
and gRPC figures.

Four servers answer the same request as the service would be sent it, with a fixed reply and no decoding
or model, each on the event loop set-up the service uses (uvloop; uvicorn with httptools for HTTP, grpcio's
asyncio server on the same loop for gRPC):
- `uvicorn-asgi`: a bare ASGI app that reads the multipart body and returns a JSON reply;
- `fastapi-multipart`: a FastAPI route taking the upload as `UploadFile` (python-multipart parses it) and
  returning a dict, as a REST model server written with FastAPI does;
- `grpc-aio`: a generic unary method on `grpc.aio` that takes and returns bytes (no protobuf);
- `grpc-aio-proto`: the same, parsing the KServe v2 ModelInferRequest and serialising a ModelInferResponse.

The REST servers are loaded by wrk with the multipart upload of bench.grpc_vs_rest, the gRPC ones by h2load
with its ModelInfer message (one JPEG as a BYTES element), closed-loop, `clients` connections. For each:
calls answered per second, p50, and the server's CPU time per call, all threads and its event loop's thread
alone (a closed loop on one core is bound by that thread).

    python -m bench.protocol_floor --clients 1,8,32 --duration 10 --out bench/results/protocol-floor-DATE
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, UploadFile  # at module level: the route's annotations are strings

from bench.grpc_load import h2load_grpc
from bench.harness import DEFAULT_IMAGES, REPO, cpu_model, cpu_seconds, free_port, service_env
from bench.runs import wrk

SERVERS = ("uvicorn-asgi", "fastapi-multipart", "grpc-aio", "grpc-aio-proto")
REPLY = {"model": "floor", "version": "1", "predictions": [{"label": "Shirt", "score": 0.9}] * 3}
METHOD = "inference.GRPCInferenceService"


def serve(kind: str, port: int) -> None:
    """Run one floor server on 127.0.0.1:`port` until killed."""
    import uvloop

    if kind in ("uvicorn-asgi", "fastapi-multipart"):
        import uvicorn

        uvicorn.run(rest_app(kind), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                    log_level="warning", access_log=False)
        return
    uvloop.run(grpc_server(kind, port))


def rest_app(kind: str) -> Any:
    body = json.dumps(REPLY).encode()
    if kind == "fastapi-multipart":
        app = FastAPI()

        @app.post("/predict")
        async def predict(file: UploadFile) -> dict[str, Any]:
            await file.read()
            return REPLY

        return app

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return asgi


async def grpc_server(kind: str, port: int) -> None:
    import grpc
    import numpy as np

    from service.rpc import protos

    req_cls, resp_cls = protos.methods(protos.KSERVE)["ModelInfer"][:2]
    reply = resp_cls(model_name="floor", model_version="1")
    reply.outputs.add(name="scores", datatype="FP32", shape=[1, 10])
    reply.raw_output_contents.append(np.linspace(0, 1, 10, dtype=np.float32).tobytes())
    raw_reply = reply.SerializeToString()

    async def raw(request: bytes, context: Any) -> bytes:
        return raw_reply

    async def parsed(request: bytes, context: Any) -> bytes:
        message = req_cls.FromString(request)
        if not message.inputs:
            raise ValueError("no inputs")
        return reply.SerializeToString()  # type: ignore[no-any-return]

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(raw if kind == "grpc-aio" else parsed)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(METHOD, {"ModelInfer": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Return once the port accepts a connection; fail if the server exits or never listens."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(f"the floor server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the floor server did not listen on {port} within {timeout_s} s")


def measure(kind: str, image: Path, clients: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.protocol_floor", "--serve", kind, "--port", str(port)],
                            cwd=REPO, env=service_env())
    try:
        wait_listening(port, proc)
        target = f"127.0.0.1:{port}"
        if kind.startswith("grpc"):
            load = lambda seconds, warm: h2load_grpc(target, "floor", image.read_bytes(), clients, seconds, warm)  # noqa: E731
        else:
            load = lambda seconds, warm: wrk(f"http://{target}", image, clients, seconds, multipart=True)  # noqa: E731
        if not kind.startswith("grpc"):
            load(warmup_s, 0)
        cpu0, loop0 = cpu_seconds(proc.pid), cpu_seconds(proc.pid, main_thread_only=True)
        res = load(duration_s, warmup_s)
        cpu1, loop1 = cpu_seconds(proc.pid), cpu_seconds(proc.pid, main_thread_only=True)
    finally:
        proc.kill()
        proc.wait()
    calls = res["http_ok"] if "http_ok" in res else res["ok"]
    # h2load's warm-up runs inside the measured CPU window: count its calls at the measured rate
    counted = calls * (duration_s + warmup_s) / duration_s if kind.startswith("grpc") else calls
    return {"server": kind, "clients": clients, "calls": calls, "calls_per_s": res["images_per_s"],
            "p50_ms": res["p50_ms"], "errors": res["errors"],
            "server_cpu_ms_per_call": (cpu1 - cpu0) / counted * 1e3 if calls else None,
            "server_loop_cpu_ms_per_call": (loop1 - loop0) / counted * 1e3 if calls else None,
            "client_cpu_ms_per_call": res["client_cpu_s"] / counted * 1e3 if calls else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    image = sorted(args.images.rglob("*.jpg"))[0]  # the image bench.grpc_vs_rest sends
    rows = []
    for rnd in range(args.rounds):
        for clients in map(int, args.clients.split(",")):
            for kind in args.servers.split(","):
                row = {"round": rnd + 1, **measure(kind, image, clients, args.duration, args.warmup)}
                rows.append(row)
                print(f"r{row['round']} c={clients:<3} {kind:18} {row['calls_per_s']:9.1f}/s "
                      f"p50 {row['p50_ms']:.3f} ms server {row['server_cpu_ms_per_call']:.3f} ms CPU/call (loop "
                      f"{row['server_loop_cpu_ms_per_call']:.3f}) client {row['client_cpu_ms_per_call']:.3f} "
                      f"errors {row['errors']}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "rows": rows,
               "image": str(image), "command": " ".join(["python -m bench.protocol_floor", *sys.argv[1:]])}
        (args.out / "results.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
