"""gRPC against this service's own REST, in one run on one server per model: REST multipart uploads by wrk
(compiled) and by the Python httpx generator (bench.load), gRPC ModelInfer by h2load (compiled, the
counterpart of wrk) and by the asyncio generator (bench.grpc_load), each closed-loop with N clients after
a warm-up. Every generator sends the same photo
(the first of the folder, as wrk does): photos differ in decoding cost. Beside each generator's figures, the
server's CPU time per image it answered in that run: the cost of each protocol's code path to the server,
apart from what each generator costs the shared machine; and the compiled generators' own CPU time per
answer. Writes the table and raw results.

    python -m bench.grpc_vs_rest [--models cnn,vgg16] [--clients 1,8,32] [--duration 20]
    python -m bench.grpc_vs_rest --store /tmp/peers-store-tiny --models tiny-64
    python -m bench.grpc_vs_rest --models cnn --generators rest-multipart-wrk,grpc-h2load \
        --variant now --variant grpc183=PYTHONPATH=/tmp/grpc183

Each `--variant NAME[=KEY=VALUE,...]` is a server of its own with those environment variables (another
grpcio on PYTHONPATH, a setting), and `code=DIR` runs that checkout of this project instead (a worktree of
an earlier commit); at each client count every variant is measured in turn, so that they share the
machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.grpc_load import h2load_grpc
from bench.harness import REPO, SHARED, cpu_model, service_env
from bench.runs import WARMUP_S, Server, ensure_model, wrk

STORE = REPO / "bench" / ".store"
IMAGES = SHARED / "datasets" / "clothing-small" / "validation"


def grpc_load(server: Server, model: str, clients: int, duration: float, stream: bool = False) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.grpc_load", "--target", server.grpc_target, "--model", model,
                          "--images", str(IMAGES), "--clients", str(clients), "--duration", str(duration),
                          "--warmup", str(WARMUP_S), "--limit-images", "1", *(["--stream"] if stream else [])],
                         cwd=REPO, env=service_env(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def http_load(server: Server, clients: int, duration: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.load", "--url", server.url, "--images", str(IMAGES),
                          "--clients", str(clients), "--duration", str(duration), "--warmup", str(WARMUP_S),
                          "--limit-images", "1"], cwd=REPO, env=service_env(), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def grpc_h2load(server: Server, model: str, image: Path, clients: int, duration: float) -> dict[str, Any]:
    return h2load_grpc(server.grpc_target, model, image.read_bytes(), clients, duration, WARMUP_S)


def counts(server: Server) -> dict[str, dict[str, float]]:
    """The server's count of ModelInfer answers so far by gRPC status code, and of batches by why they ran."""
    out: dict[str, dict[str, float]] = {"codes": {}, "batches": {}}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name == "imgserve_grpc_requests_total" and sample.labels["method"] == "ModelInfer":
                key, into = sample.labels["code"], out["codes"]
            elif sample.name == "imgserve_batches_total":
                key, into = sample.labels["reason"], out["batches"]
            else:
                continue
            into[key] = into.get(key, 0) + sample.value
    return out


def delta(now: dict[str, float], then: dict[str, float]) -> dict[str, float]:
    return {k: v - then.get(k, 0) for k, v in now.items() if v > then.get(k, 0)}


def with_server_cost(server: Server, generate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A generator's result with the server's CPU time per image it answered, over the whole run (warm-up
    included, on both sides): what the protocol's code path costs the server, whatever the generator costs.
    Also its event loop's thread alone (`server_loop_cpu_ms_per_image`): one process under a closed loop
    is bound by that thread, while grpcio's poller and the model run beside it.
    With the generator's own CPU time per image where it reports it (warm-up included too), and the
    server's gRPC status codes (h2load cannot see them): a call that was not OK is an error, but for the
    calls h2load cancels at its end. And the batches the server ran, by why they ran (`inline`: on the
    event loop, as a lone request does)."""
    rows0, cpu0, counts0 = server.batch_totals()[0], server.cpu_seconds(), counts(server)
    loop0 = server.cpu_seconds(main_thread_only=True)
    res = generate()
    rows = server.batch_totals()[0] - rows0
    out = {**res, "server_images": rows,
           "server_cpu_ms_per_image": (server.cpu_seconds() - cpu0) / rows * 1e3 if rows else None,
           "server_loop_cpu_ms_per_image":
               (server.cpu_seconds(main_thread_only=True) - loop0) / rows * 1e3 if rows else None}
    if "client_cpu_s" in res and rows:
        out["client_cpu_ms_per_image"] = res["client_cpu_s"] / rows * 1e3
    counts1 = counts(server)
    out["batches_by_reason"] = delta(counts1["batches"], counts0["batches"])
    codes = delta(counts1["codes"], counts0["codes"])
    if res.get("tool") == "h2load-grpc":
        out["grpc_codes"] = codes
        failed = sum(v for k, v in codes.items() if k not in ("OK", "CANCELLED"))
        out["errors"] = res["errors"] + failed + max(0, codes.get("CANCELLED", 0) - res["clients"])
    return out


GENERATORS = ("rest-multipart-wrk", "rest-multipart-httpx", "grpc-h2load", "grpc-aio", "grpc-aio-stream")


def _variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition("=")
    env = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, env


def _line(row: dict[str, Any]) -> str:
    client = row.get("client_cpu_ms_per_image")
    return (f"{row['model']:6} {row['variant']:10} r{row['round']} c={row['clients']:<3} {row['generator']:22} "
            f"{row['images_per_s']:8.1f}/s p50 {row['p50_ms']:.2f} ms "
            f"server {row['server_cpu_ms_per_image']:.3f} ms CPU/image "
            f"(loop {row['server_loop_cpu_ms_per_image']:.3f}) "
            f"errors {row.get('errors', 0)}" + (f" client {client:.3f} ms CPU/image" if client else "")
            + f" batches {row['batches_by_reason']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn,vgg16", help="benchmark models (built on first use), or with --store "
                   "the names of models in that store")
    p.add_argument("--store", type=Path, help="a model store of your own (the peers' tiny CNN: "
                   "/tmp/peers-store-tiny, made by ../shared/peers' to_project_store)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--vgg16-clients", default="32")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=1, help="every client count, this many times over")
    p.add_argument("--generators", default=",".join(GENERATORS), help=f"some of {','.join(GENERATORS)}")
    p.add_argument("--variant", action="append", default=[], help="NAME[=KEY=VALUE,...]: a server with that "
                   "environment (default: one, `this`)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"grpc-{time.strftime('%Y%m%d-%H%M')}")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = args.generators.split(",")
    if unknown := set(chosen) - set(GENERATORS):
        p.error(f"unknown generators: {', '.join(sorted(unknown))}")
    variants = dict(_variant(v) for v in args.variant or ["this"])
    image = sorted(IMAGES.rglob("*.jpg"))[0]
    rows = []
    for kind in args.models.split(","):
        store, model = (args.store, kind) if args.store else (STORE, ensure_model(STORE, kind).parent.name)
        servers: dict[str, Server] = {}
        try:
            for name, env in variants.items():
                settings = {k: v for k, v in env.items() if k != "code"}
                servers[name] = Server(store, model, args.out / f"server-{kind}-{name}.log",
                                       Path(env.get("code", REPO)).resolve(), **settings)
            levels = args.vgg16_clients if kind == "vgg16" else args.clients
            for rnd, clients in ((r, c) for r in range(args.rounds) for c in map(int, levels.split(","))):
                for variant, server in servers.items():
                    wrk(server.url, image, clients, WARMUP_S, multipart=True)
                    generators = {
                        "rest-multipart-wrk": partial(wrk, server.url, image, clients, args.duration, multipart=True),
                        "rest-multipart-httpx": partial(http_load, server, clients, args.duration),
                        "grpc-h2load": partial(grpc_h2load, server, model, image, clients, args.duration),
                        "grpc-aio": partial(grpc_load, server, model, clients, args.duration),
                        "grpc-aio-stream": partial(grpc_load, server, model, clients, args.duration, stream=True)}
                    for name in chosen:
                        res = with_server_cost(server, generators[name])
                        row = {"model": kind, "variant": variant, "round": rnd + 1, "clients": clients,
                               "generator": name, **res}
                        rows.append(row)
                        print(_line(row), flush=True)
        finally:
            for server in servers.values():
                server.stop()
    doc = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "variants": variants, "rows": rows,
           "command": " ".join(["python -m bench.grpc_vs_rest", *sys.argv[1:]])}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
