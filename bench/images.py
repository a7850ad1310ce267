"""The serving image against the full one, in one run: image sizes, container start to ready from an S3
store (an empty cache: the download time; a warm cache), and VGG16 images/s at N clients, paired rounds.

    python -m bench.images [--model-dir bench/.store/bench-vgg16v/1] [--clients 32] [--duration 20] [--rounds 2]

Needs the two images (`docker compose build api demo-init`, or `docker build --target serve -t
imgserve:serve .` and `docker build -t imgserve:latest .`) and a Docker engine (scripts/container-engine.sh
starts one where there is none). The store is a real S3 API (moto's server, on the host's loopback);
containers use the host network. The version is served by its int8 variant (IMGSERVE_MAX_ACCURACY_DROP
is raised: the benchmark model has random weights). Writes bench/results/images-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import REPO, SHARED, cpu_model, free_port
from bench.runs import WARMUP_S, wrk

IMAGES = {"serve": "imgserve:serve", "full": "imgserve:latest"}


def engine_env() -> dict[str, str]:
    out = subprocess.run(["bash", "scripts/container-engine.sh", "up"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=1800).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def docker(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, check=True,
                          timeout=timeout).stdout.strip()


class Container:
    def __init__(self, env: dict[str, str], image: str, store: dict[str, str], cache: Path) -> None:
        self.env, self.port, self.name = env, free_port(), f"imgserve-bench-{free_port()}"
        settings = {**store, "IMGSERVE_PORT": str(self.port), "IMGSERVE_GRPC_PORT": str(free_port()),
                    "IMGSERVE_HOST": "127.0.0.1", "IMGSERVE_STORE_CACHE_DIR": "/cache",
                    "IMGSERVE_MAX_ACCURACY_DROP": "100", "IMGSERVE_MAX_BATCH_SIZE": "32",
                    "IMGSERVE_MAX_QUEUE_ROWS": "1024", "IMGSERVE_REQUEST_TIMEOUT_MS": "120000"}
        flags = [x for k, v in settings.items() for x in ("-e", f"{k}={v}")]
        t0 = time.perf_counter()
        docker(env, "run", "-d", "--name", self.name, "--network", "host", "-v", f"{cache}:/cache", *flags, image)
        while True:
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"{image} not ready: {self.logs()[-3000:]}")
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - t0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        r = subprocess.run(["docker", "logs", self.name], env=self.env, capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr

    def download_s(self) -> float | None:
        m = re.search(r"fetched \S+ version \d+ from \S+: \d+ files, [\d.]+ MB in ([\d.]+)s", self.logs())
        return float(m.group(1)) if m else None

    def runtime(self) -> str:
        served = httpx.get(self.url + "/health/ready", timeout=10).json()["runtimes"]
        return ", ".join(f"{v['runtime']}/{v['precision']}" for v in served.values())

    def stop(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], env=self.env, capture_output=True, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=REPO / "bench" / ".store" / "bench-vgg16v" / "1")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import logging

    from moto.server import ThreadedMotoServer

    from service.remote import publish_version

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    env = engine_env()
    for image in IMAGES.values():
        docker(env, "image", "inspect", image)  # fails with the reason when an image is missing
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    moto_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
    publish_version(args.model_dir, "s3://bench/models", "vgg16", endpoint)
    store = {"IMGSERVE_MODEL_STORE": "s3://bench/models", "IMGSERVE_S3_ENDPOINT_URL": endpoint,
             "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    photo = sorted((SHARED / "datasets" / "clothing-small" / "validation").rglob("*.jpg"))[0]
    doc: dict[str, Any] = {"command": " ".join(["python -m bench.images", *sys.argv[1:]]),
                           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                       "python": platform.python_version()},
                           "images": {}, "rounds": []}
    caches, warm = {}, {}
    try:
        for key, image in IMAGES.items():
            caches[key] = Path(tempfile.mkdtemp(prefix=f"imgserve-cache-{key}-"))
            caches[key].chmod(0o777)
            cold = Container(env, image, store, caches[key])
            entry = {"image": image, "bytes": int(docker(env, "image", "inspect", image, "--format", "{{.Size}}")),
                     "ready_from_empty_cache_s": cold.ready_s, "download_s": cold.download_s(),
                     "runtime": cold.runtime()}
            cold.stop()
            warm[key] = Container(env, image, store, caches[key])
            entry["ready_from_warm_cache_s"] = warm[key].ready_s
            entry["warm_start_downloaded"] = "fetched vgg16" in warm[key].logs()
            doc["images"][key] = entry
            print(json.dumps(entry), flush=True)
        for r in range(args.rounds):
            row = {}
            for key in IMAGES:
                wrk(warm[key].url, photo, args.clients, WARMUP_S, multipart=True)
                row[key] = wrk(warm[key].url, photo, args.clients, args.duration, multipart=True)
            row["ratio"] = row["serve"]["images_per_s"] / row["full"]["images_per_s"]
            doc["rounds"].append(row)
            print(f"round {r + 1}: serve {row['serve']['images_per_s']:.2f}/s, "
                  f"full {row['full']['images_per_s']:.2f}/s, ratio {row['ratio']:.3f}", flush=True)
        doc["median_ratio"] = statistics.median(r["ratio"] for r in doc["rounds"])
    finally:
        for c in warm.values():
            c.stop()
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
        s3.stop()
    out = REPO / "bench" / "results" / f"images-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"median serve/full {doc['median_ratio']:.3f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
