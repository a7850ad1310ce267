"""`python -m bench.variants`: every runtime and precision of one model, in process and through the
service, paired in one run, against the CPU's peak per precision.

    python -m bench.variants                                   # VGG16 224 (hed convolutions) with its variants
    python -m bench.variants --version-dir model_store/clothing/3 --clients 1,8,32

For each runtime (the SavedModel in TensorFlow, then each variant) the in-process limit is measured in
a fresh process, then a server forced to that runtime is measured at each concurrency; last, a server
with the default settings (which picks for itself) is measured, paired with the limit of what it picked.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_IMAGES, REPO, service_env
from bench.runs import Server, in_process, load

FORCE = {"tensorflow-fp32": {"IMGSERVE_RUNTIME": "tensorflow"}}


def ensure_variants_model(store: Path, images: Path) -> Path:
    from service import store as layout

    versions = layout.list_versions(store, "bench-vgg16v")
    if versions:
        return store / "bench-vgg16v" / str(versions[-1])
    code = ("import sys; from pathlib import Path; from bench.models import build_with_variants; "
            "print(build_with_variants(Path(sys.argv[1]), Path(sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, str(store), str(images.parent / "train")], cwd=REPO,
                         env=service_env(), check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def force(key: str) -> dict[str, str]:
    runtime, precision = key.split("-", 1)
    return FORCE.get(key, {"IMGSERVE_RUNTIME": runtime, "IMGSERVE_PRECISION": precision,
                           "IMGSERVE_MAX_ACCURACY_DROP": "100"})


def measure(vdir: Path, args: argparse.Namespace, key: str, settings: dict[str, str], log: Path) -> dict[str, Any]:
    """The limit of `key` in process, then the service with `settings` at each concurrency."""
    limit = in_process(vdir, args.images, 32, 3, [1, 8, 16, 32], runtime=key)
    best = limit["best_images_per_s"]
    print(f"[{key}] in process {best:.1f} images/s, batch 1 {limit['batch1_latency_ms']:.1f} ms", flush=True)
    name = vdir.parent.name
    server = Server(vdir.parent.parent, name, log, **{"IMGSERVE_PINNED_VERSIONS": f"{name}={vdir.name}", **settings})
    import httpx

    served = httpx.get(server.url + "/health/ready").json()["runtimes"][name]
    levels = []
    try:
        for c in args.clients:
            r = load(server, args.images, c, args.duration, "python")
            levels.append(r)
            print(f"[{key}] {c} clients: {r['images_per_s']:.1f} images/s ({r['images_per_s'] / best:.2f} of in "
                  f"process), p50 {r.get('p50_ms') or 0:.1f} ms, RSS {r['rss_bytes'] / 2**20:.0f} MiB", flush=True)
    finally:
        server.stop()
    return {"runtime": key, "settings": settings, "served": served, "limit": limit, "service": levels,
            "startup_s": server.startup_s, "rss_after_warmup_bytes": server.rss_after_warmup}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version-dir", type=Path, help="a published version with variants (default: build one)")
    p.add_argument("--store", type=Path, default=REPO / "bench" / ".store")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--runtimes", help="comma-separated keys to force (default: the SavedModel and every variant)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    from bench.__main__ import machine
    from bench.ceiling import flop_ceiling
    from service.store import read_metadata

    vdir = args.version_dir or ensure_variants_model(args.store, args.images)
    meta = read_metadata(vdir)
    keys = args.runtimes.split(",") if args.runtimes else ["tensorflow-fp32", *[v.key for v in meta.variants]]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    given = sys.argv[1:] if argv is None else argv
    run: dict[str, Any] = {"started": stamp, "command": " ".join(["python -m bench.variants", *given]),
                           "machine": machine(), "version_dir": str(vdir), "ceiling": flop_ceiling(),
                           "variants": [v.model_dump(mode="json") for v in meta.variants], "forced": [],
                           "defaults": None}
    print(f"peak: {run['ceiling']['peak_gops']} -> VGG16 images/s {run['ceiling']['vgg16_images_per_s_at_peak']}",
          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for key in keys:
        run["forced"].append(measure(vdir, args, key, force(key), args.out / f"{stamp}-{key}.log"))
    from service.cpu import cpu_has_bf16
    from service.runtimes import choose
    from service.settings import Settings

    picked = choose(meta, Settings(), gpu=False, bf16=cpu_has_bf16())  # what a server with defaults serves
    key = picked[0].key if picked else "tensorflow-fp32"
    run["defaults"] = measure(vdir, args, key, {}, args.out / f"{stamp}-defaults.log")
    served = run["defaults"]["served"]
    assert f"{served['runtime']}-{served['precision']}" == key, (served, key)
    run["defaults"]["budget_points"] = Settings().max_accuracy_drop
    path = args.out / f"{stamp}-variants.json"
    path.write_text(json.dumps(run, indent=2))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
