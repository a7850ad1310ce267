"""The pieces of a benchmark run: the models, the in-process limit, the server and the load generators."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from bench.harness import REPO, ServerProcess, metric_sum, rss_bytes, service_env

MODELS = {
    # name: (backbone, input size, concurrency levels, batching-off level, load generator under `auto`,
    #        batches in flight as the README advises: 2 for the compute-bound model, 1 for the small one)
    # VGG16 answers a few images a second: the Python client costs nothing there and measures the
    # steady state between batch bursts; the tiny CNN needs wrk (compiled) from 16 clients up.
    "vgg16": ("vgg16", 224, [1, 4, 8, 16, 32, 64], 32, "python", 2),
    "cnn": ("cnn", 64, [1, 4, 16, 64], 16, "wrk", 1),
}
WARMUP_S = 5.0


def ensure_model(store: Path, kind: str) -> Path:
    """A published version of the benchmark model (random weights: speed does not depend on them)."""
    from service import store as layout

    versions = layout.list_versions(store, f"bench-{kind}")
    if versions:
        return store / f"bench-{kind}" / str(versions[-1])
    backbone, size, _, _, _, _ = MODELS[kind]
    code = (
        "import sys; from pathlib import Path; from bench.models import build; "
        f"print(build(Path(sys.argv[1]), {kind!r}, {backbone!r}, {size}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(store)], cwd=REPO, env=service_env(), check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def in_process(version_dir: Path, images: Path, max_batch: int, repeats: int,
               sizes: list[int] | None = None, runtime: str = "tensorflow-fp32") -> dict[str, Any]:
    """`bench.limit` in a fresh process: the runtime (SavedModel or a variant key) called directly."""
    extra = [",".join(map(str, sizes)) if sizes else "all", runtime]
    out = subprocess.run([sys.executable, "-m", "bench.limit", str(version_dir), str(images), str(max_batch),
                          str(repeats), *extra], cwd=REPO, env=service_env(), check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def served_runtime(server: ServerProcess, model: str) -> str:
    """The key of the runtime serving `model` (`tensorflow-fp32`, `openvino-int8`, ...), for `in_process`."""
    served = httpx.get(server.url + "/health/ready", timeout=10).json()["runtimes"][model]
    return f"{served['runtime']}-{served['precision']}"


class Server(ServerProcess):
    """The service as the benchmarks run it: one model, a deep queue and long deadlines."""

    def __init__(self, store: Path, model: str, log: Path, code: Path = REPO, **settings: str) -> None:
        defaults = {"IMGSERVE_PINNED_VERSIONS": "", "IMGSERVE_DEFAULT_MODEL": model, "IMGSERVE_MODELS": model,
                    "IMGSERVE_MAX_QUEUE_ROWS": "1024", "IMGSERVE_REQUEST_TIMEOUT_MS": "120000"}
        super().__init__(store, log, ready_timeout=600, code=code, **{**defaults, **settings})

    def batch_totals(self) -> tuple[float, float]:
        text = self.metrics()
        return metric_sum(text, "imgserve_batch_size_sum"), metric_sum(text, "imgserve_batch_size_count")


def wrk(url: str, image: Path, clients: int, seconds: float, multipart: bool = False) -> dict[str, Any]:
    """wrk posting one JPEG (raw, or as a multipart upload) from `clients` connections for `seconds`, with
    wrk's own CPU time (`client_cpu_s`)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{int(seconds)}s", "--timeout", "120s",
         "-s", str(REPO / "bench" / "wrk_post.lua"), url + "/predict"],
        env={**os.environ, "BENCH_IMAGE": str(image), "BENCH_MULTIPART": "1" if multipart else "0"},
        capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    res["client_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    ok = res["requests"] - res["non2xx"]
    res.update(clients=clients, ok=ok, body="multipart" if multipart else "raw",
               errors=res["non2xx"] + res["socket_errors"], images_per_s=ok / res["duration_s"])
    return res


def load(server: Server, images: Path, clients: int, duration: float, tool: str) -> dict[str, Any]:
    """`clients` closed-loop clients for WARMUP_S seconds, then `duration` seconds measured."""
    use_wrk = tool == "wrk" and shutil.which("wrk")
    if use_wrk:
        image = sorted(images.rglob("*.jpg"))[0]
        wrk(server.url, image, clients, WARMUP_S)
        rows0, n0 = server.batch_totals()
        res = wrk(server.url, image, clients, duration)
    else:
        rows0, n0 = server.batch_totals()
        out = subprocess.run([sys.executable, "-m", "bench.load", "--url", server.url, "--images", str(images),
                              "--clients", str(clients), "--duration", str(duration), "--warmup", str(WARMUP_S)],
                             cwd=REPO, env=service_env(), capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    rows1, n1 = server.batch_totals()
    res["mean_batch_size"] = (rows1 - rows0) / (n1 - n0) if n1 > n0 else None
    res["rss_bytes"] = rss_bytes(server.proc.pid)
    return res


def pick_tool(asked: str, model_tool: str, clients: int) -> str:
    if asked != "auto":
        return asked
    return "wrk" if model_tool == "wrk" and clients >= 16 and shutil.which("wrk") else "python"


