"""`python -m bench`: the in-process limit, the service under load (batching on and off), for VGG16 at
224x224 and a tiny CNN; writes JSON, a Markdown table and a PNG plot per run.

    python -m bench                       # both models, default levels (about 10 minutes on 2 cores)
    python -m bench --models cnn --duration 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_IMAGES, REPO
from bench.runs import MODELS, Server, ensure_model, in_process, load, pick_tool, served_runtime


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
    p.add_argument("--variants", choices=("yes", "no"), default="yes",
                   help="then every runtime and precision of VGG16 (python -m bench.variants)")
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
        entry: dict[str, Any] = {"version_dir": str(vdir), "input": size, "limit": None, "service": [],
                                 "baseline": None}
        settings = {"IMGSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
                    "IMGSERVE_MAX_BATCH_DELAY_MS": str(args.batch_delay_ms),
                    "IMGSERVE_BATCHES_IN_FLIGHT": str(in_flight)}
        entry["settings"] = settings
        server = Server(args.store, f"bench-{kind}", args.out / f"{stamp}-{kind}-server.log", **settings)
        entry["startup_s"] = server.startup_s
        entry["rss_after_warmup_bytes"] = server.rss_after_warmup
        entry["runtime"] = served_runtime(server, f"bench-{kind}")
        try:
            for c in levels:
                print(f"[{kind}] {c} clients ...", flush=True)
                entry["service"].append(load(server, args.images, c, args.duration, pick_tool(args.tool, auto_tool, c)))
        finally:
            server.stop()
        print(f"[{kind}] in-process limit ({entry['runtime']}, what the service ran) ...", flush=True)
        entry["limit"] = in_process(vdir, args.images, 64, 3 if kind == "vgg16" else 20, runtime=entry["runtime"])
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
    if args.variants == "yes":
        from bench.variants import main as variants

        return variants(["--images", str(args.images), "--duration", str(args.duration), "--store", str(args.store)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
