"""`python -m bench`: the in-process limit, the service under load (batching on and off), for VGG16 at
224x224 and a tiny CNN; writes JSON, a Markdown table and a PNG plot per run.

    python -m bench                       # both models, default levels (about 10 minutes on 2 cores)
    python -m bench --models cnn --duration 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "clothing-small" / "validation"
MODELS = {
    # name: (backbone, input size, concurrency levels, batching-off level, load generator under `auto`,
    #        batches in flight as the README advises: 2 for the compute-bound model, 1 for the small one)
    # VGG16 answers a few images a second: the Python client costs nothing there and measures the
    # steady state between batch bursts; the tiny CNN needs wrk (compiled) from 16 clients up.
    "vgg16": ("vgg16", 224, [1, 4, 8, 16, 32, 64], 32, "python", 2),
    "cnn": ("cnn", 64, [1, 4, 16, 64], 16, "wrk", 1),
}
WARMUP_S = 5.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


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
    out = subprocess.run([sys.executable, "-c", code, str(store)], cwd=REPO, env=_env(), check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def in_process(version_dir: Path, images: Path, max_batch: int, repeats: int,
               sizes: list[int] | None = None) -> dict[str, Any]:
    extra = [",".join(map(str, sizes))] if sizes else []
    out = subprocess.run([sys.executable, "-m", "bench.limit", str(version_dir), str(images), str(max_batch),
                          str(repeats), *extra], cwd=REPO, env=_env(), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    def __init__(self, store: Path, model: str, log: Path, **settings: str) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**_env(), "IMGSERVE_MODEL_STORE": str(store), "IMGSERVE_HOST": "127.0.0.1",
               "IMGSERVE_PORT": str(self.port), "IMGSERVE_PINNED_VERSIONS": "", "IMGSERVE_DEFAULT_MODEL": model,
               "IMGSERVE_MODELS": model,
               "IMGSERVE_MAX_QUEUE_ROWS": "1024", "IMGSERVE_REQUEST_TIMEOUT_MS": "120000", **settings}
        t0 = time.perf_counter()
        self.log = log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=fh,
                                         stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server died: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0
        self.rss_after_warmup = rss_bytes(self.proc.pid)

    def batch_totals(self) -> tuple[float, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        rows = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("imgserve_batch_size_sum"))
        n = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("imgserve_batch_size_count"))
        return rows, n

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(url: str, image: Path, clients: int, seconds: float) -> dict[str, Any]:
    """wrk posting one JPEG from `clients` connections for `seconds`; its figures as a dict."""
    out = subprocess.run(
        ["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{int(seconds)}s", "--timeout", "120s",
         "-s", str(REPO / "bench" / "wrk_post.lua"), url + "/predict"],
        env={**os.environ, "BENCH_IMAGE": str(image)}, capture_output=True, text=True, check=True)
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    ok = res["requests"] - res["non2xx"]
    res.update(clients=clients, ok=ok, errors=res["non2xx"] + res["socket_errors"],
               images_per_s=ok / res["duration_s"])
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
                             cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    rows1, n1 = server.batch_totals()
    res["mean_batch_size"] = (rows1 - rows0) / (n1 - n0) if n1 > n0 else None
    res["rss_bytes"] = rss_bytes(server.proc.pid)
    return res


def pick_tool(asked: str, model_tool: str, clients: int) -> str:
    if asked != "auto":
        return asked
    return "wrk" if model_tool == "wrk" and clients >= 16 and shutil.which("wrk") else "python"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import tensorflow as tf

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "numpy": numpy.__version__,
            "gpus": [g.name for g in tf.config.list_physical_devices("GPU")],
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg16,cnn", help="comma-separated: vgg16, cnn")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs to post")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    p.add_argument("--store", type=Path, default=REPO / "bench" / ".store", help="where benchmark models live")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--tool", choices=("auto", "python", "wrk"), default="auto",
                   help="load generator: auto uses wrk for the tiny CNN from 16 clients up, Python otherwise")
    p.add_argument("--batch-delay-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batches-in-flight", type=int, default=0, help="0: per model, as in MODELS")
    p.add_argument("--levels", help="override concurrency levels, e.g. 1,8,32")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run: dict[str, Any] = {"started": stamp, "command": " ".join(["python -m bench", *sys.argv[1:]]),
                           "machine": machine(), "ceiling": None, "models": {}}
    from bench.ceiling import flop_ceiling

    run["ceiling"] = flop_ceiling()
    for kind in args.models.split(","):
        backbone, size, levels, off_level, auto_tool, in_flight = MODELS[kind]
        in_flight = args.batches_in_flight or in_flight

        if args.levels:
            levels = [int(x) for x in args.levels.split(",")]
        vdir = ensure_model(args.store, kind)
        print(f"[{kind}] in-process limit ...", flush=True)
        limit = in_process(vdir, args.images, 64, 3 if kind == "vgg16" else 20)
        entry: dict[str, Any] = {"version_dir": str(vdir), "input": size, "limit": limit, "service": [],
                                 "baseline": None}
        settings = {"IMGSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
                    "IMGSERVE_MAX_BATCH_DELAY_MS": str(args.batch_delay_ms),
                    "IMGSERVE_BATCHES_IN_FLIGHT": str(in_flight)}
        entry["settings"] = settings
        server = Server(args.store, f"bench-{kind}", args.out / f"{stamp}-{kind}-server.log", **settings)
        entry["startup_s"] = server.startup_s
        entry["rss_after_warmup_bytes"] = server.rss_after_warmup
        try:
            for c in levels:
                print(f"[{kind}] {c} clients ...", flush=True)
                entry["service"].append(load(server, args.images, c, args.duration, pick_tool(args.tool, auto_tool, c)))
        finally:
            server.stop()
        print(f"[{kind}] batching off at {off_level} clients ...", flush=True)
        off = Server(args.store, f"bench-{kind}", args.out / f"{stamp}-{kind}-nobatch.log",
                     IMGSERVE_MAX_BATCH_SIZE="1", IMGSERVE_MAX_BATCH_DELAY_MS="0",
                     IMGSERVE_BATCHES_IN_FLIGHT=str(in_flight))
        try:
            entry["baseline"] = load(off, args.images, off_level, args.duration,
                                     pick_tool(args.tool, auto_tool, off_level))
        finally:
            off.stop()
        run["models"][kind] = entry
    from bench.report import write_outputs

    paths = write_outputs(run, args.out, stamp, REPO / "docs" / "benchmarks.md")
    print("\n".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
