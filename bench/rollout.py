"""Rollout figures on a real server (the tiny benchmark CNN, two copies of one version):

    python -m bench.rollout                        # canary split, rollback under load, promote/rollback soak
    python -m bench.rollout --cycles 200 --clients 32

1. Canary at 10%: `--requests` (4,000) requests with no routing key, the share the canary answered; then
   `--keys` keys sending `--per-key` requests each, how many keys saw more than one version.
2. Rollback under load, two server processes: `--clients` closed-loop clients; the time from the
   rollback command until every process answers from the stable version (read from each answer's
   X-Model-Version: the last answer from the rolled-back version), and the failed requests.
3. `--cycles` promote/rollback cycles between the two versions, one process: resident memory after each
   cycle has taken effect, and its least-squares slope in MiB per cycle.
4. Shadow at 100% on a saturated server: VGG16 int8 (the hed convolutions, `bench.models`), stable and
   shadow both of it; `--clients` clients, images/s and p50 without and with the shadow, paired in
   `--rounds` rounds; then one client, the share of requests that were also shadowed.
Prints and writes one JSON object (bench/results/rollout-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.harness import DEFAULT_IMAGES, REPO, ServerProcess
from bench.runs import ensure_model
from service import rollout


def _copy_as_two_versions(store: Path, work: Path) -> tuple[Path, str, int]:
    src = ensure_model(store, "cnn")
    name = src.parent.name
    root = work / "store"
    (root / name).mkdir(parents=True)
    shutil.copytree(src, root / name / "1")
    shutil.copytree(src, root / name / "2")
    for v in (1, 2):
        doc = json.loads((root / name / str(v) / "model.json").read_text())
        (root / name / str(v) / "model.json").write_text(json.dumps({**doc, "version": v}))
    return root, name, 2


def _post(client: httpx.Client, image: bytes, **headers: str) -> httpx.Response:
    return client.post("/predict", content=image, headers={"Content-Type": "image/jpeg", **headers})


def canary_split(root: Path, name: str, work: Path, image: bytes, requests: int, keys: int,
                 per_key: int) -> dict[str, Any]:
    rollout.run_command(root, name, "promote", {"version": 1}, 100)
    rollout.run_command(root, name, "canary", {"percent": 10, "version": 2}, 100)  # 1 stable, 2 canary
    server = ServerProcess(root, work / "canary.log", IMGSERVE_MAX_QUEUE_ROWS="1024")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            versions = Counter(_post(c, image).headers["x-model-version"] for _ in range(requests))
            mixed = 0
            on_canary = 0
            for k in range(keys):
                seen = {_post(c, image, **{"X-Route-Key": f"caller-{k}"}).headers["x-model-version"]
                        for _ in range(per_key)}
                mixed += len(seen) > 1
                on_canary += seen == {"2"}
    finally:
        server.stop()
    rollout.run_command(root, name, "rollback", {}, 100)
    return {"requests": requests, "canary_share": versions["2"] / requests, "by_version": dict(versions),
            "keys": keys, "requests_per_key": per_key, "keys_on_more_than_one_version": mixed,
            "keys_on_the_canary": on_canary}


def rollback_under_load(root: Path, name: str, work: Path, image: bytes, clients: int) -> dict[str, Any]:
    rollout.write(root, name, rollout.RolloutState(stable=2, seen=2))
    server = ServerProcess(root, work / "rollback.log", IMGSERVE_WORKERS="2", IMGSERVE_POLL_INTERVAL_S="0.5",
                           IMGSERVE_MAX_QUEUE_ROWS="1024", IMGSERVE_VERSION_POLICY="all")
    answers: list[tuple[float, int, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = _post(c, image, Connection="close")  # a new connection each time: spread over processes
                    answers.append((time.monotonic(), r.status_code, r.headers.get("x-model-version", "")))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        while len(answers) < 500:
            time.sleep(0.05)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "service.rollout", "--store", str(root), name, "rollback"], cwd=REPO,
                       check=True, capture_output=True)
        t_cmd = time.monotonic()
        while not answers or answers[-1][0] < t_cmd + 5:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        server.stop()
    last_old = max((t for t, _, v in answers if v == "2" and t >= t0), default=t0)
    statuses = Counter(s for _, s, _ in answers)
    return {"clients": clients, "processes": 2, "answers": len(answers), "statuses": dict(statuses),
            "client_errors": len(errors), "seconds_from_command_to_last_answer_from_the_old_version":
            round(last_old - t0, 3), "command_seconds": round(t_cmd - t0, 3)}


def cycles_soak(root: Path, name: str, work: Path, image: bytes, cycles: int) -> dict[str, Any]:
    rollout.write(root, name, rollout.RolloutState(stable=1, seen=2))
    server = ServerProcess(root, work / "cycles.log", IMGSERVE_POLL_INTERVAL_S="0.2", IMGSERVE_VERSION_POLICY="none")
    rss: list[int] = []
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for i in range(cycles):
                for command, want in (("promote", "2"), ("rollback", "1")):
                    args = {"version": 2} if command == "promote" else {}
                    rollout.run_command(root, name, command, args, 100)
                    while _post(c, image).headers["x-model-version"] != want:
                        time.sleep(0.05)
                rss.append(server.rss())
                if i % 20 == 0:
                    print(f"cycle {i}: {rss[-1] / 2**20:.1f} MiB", file=sys.stderr)
    finally:
        server.stop()
    x = np.arange(len(rss))
    half = len(rss) // 4  # after the first quarter: allocator pools warm up in the first cycles
    slope = float(np.polyfit(x[half:], np.array(rss[half:]) / 2**20, 1)[0]) if len(rss) - half >= 2 else None
    return {"cycles": cycles, "rss_first_mib": rss[0] / 2**20, "rss_last_mib": rss[-1] / 2**20,
            "slope_mib_per_cycle_after_first_quarter": slope}


def shadow_saturated(store: Path, work: Path, clients: int, seconds: float, rounds: int) -> dict[str, Any]:
    from bench.harness import metric_sum
    from bench.models import build_with_variants
    from bench.runs import Server, load
    from service import store as layout

    versions = layout.list_versions(store, "bench-vgg16v")
    src = store / "bench-vgg16v" / str(versions[-1]) if versions else build_with_variants(store, DEFAULT_IMAGES)
    root = work / "vgg-store"
    for v in (1, 2):
        shutil.copytree(src, root / "vgg" / str(v))
        doc = json.loads((root / "vgg" / str(v) / "model.json").read_text())
        (root / "vgg" / str(v) / "model.json").write_text(json.dumps({**doc, "name": "vgg", "version": v}))
    server = Server(root, "vgg", work / "shadow.log", IMGSERVE_PRECISION="int8", IMGSERVE_MAX_ACCURACY_DROP="100",
                    IMGSERVE_BATCHES_IN_FLIGHT="2",
                    IMGSERVE_VERSION_POLICY="all", IMGSERVE_POLL_INTERVAL_S="0.5")
    out: dict[str, Any] = {"clients": clients, "seconds": seconds, "runtime": None, "rounds": []}

    def set_shadow(percent: float) -> None:
        state = rollout.RolloutState(stable=1, seen=2, shadow=2 if percent else None, shadow_percent=percent)
        rollout.write(root, "vgg", state)
        want = 2 if percent else None
        while httpx.get(server.url + "/v1/models/vgg/rollout", timeout=30).json()["serving"]["shadow"] != want:
            time.sleep(0.2)

    def shadow_counts() -> dict[str, float]:
        text = server.metrics()
        return {o: metric_sum(text, "imgserve_shadow_requests_total", outcome=o) for o in ("compared", "dropped")}

    try:
        out["runtime"] = httpx.get(server.url + "/health/ready", timeout=30).json()["runtimes"]["vgg"]
        for _ in range(rounds):
            row: dict[str, Any] = {}
            for label, percent in (("without", 0.0), ("with", 100.0)):
                set_shadow(percent)
                before = shadow_counts()
                res = load(server, DEFAULT_IMAGES, clients, seconds, "python")
                after = shadow_counts()
                row[label] = {"images_per_s": res.get("images_per_s"), "p50_ms": res.get("p50_ms"),
                              "shadow": {k: after[k] - before[k] for k in after}}
                print(json.dumps({label: row[label]}), file=sys.stderr)
            row["throughput_ratio"] = row["with"]["images_per_s"] / row["without"]["images_per_s"]
            row["p50_ratio"] = row["with"]["p50_ms"] / row["without"]["p50_ms"]
            out["rounds"].append(row)
        set_shadow(100.0)
        before = shadow_counts()
        res = load(server, DEFAULT_IMAGES, 1, seconds, "python")
        after = shadow_counts()
        out["one_client"] = {"images_per_s": res.get("images_per_s"), "p50_ms": res.get("p50_ms"),
                             "shadow": {k: after[k] - before[k] for k in after}, "load": res}
    finally:
        server.stop()
    out["median_throughput_ratio"] = float(np.median([r["throughput_ratio"] for r in out["rounds"]]))
    out["median_p50_ratio"] = float(np.median([r["p50_ratio"] for r in out["rounds"]]))
    sh = out["one_client"]["shadow"]
    out["one_client_shadowed_share"] = sh["compared"] / max(sh["compared"] + sh["dropped"], 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=REPO / "bench" / ".store", help="where benchmark models live")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--keys", type=int, default=40)
    p.add_argument("--per-key", type=int, default=25)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds of each shadow load phase")
    p.add_argument("--rounds", type=int, default=2, help="paired rounds without and with the shadow")
    p.add_argument("--skip", nargs="*", default=[], choices=("canary", "rollback", "cycles", "shadow"))
    a = p.parse_args()
    image = sorted(DEFAULT_IMAGES.rglob("*.jpg"))[0].read_bytes()
    out: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "when": time.strftime("%F %T")}
    with tempfile.TemporaryDirectory(prefix="imgserve-bench-rollout-") as tmp:
        work = Path(tmp)
        root, name, _ = _copy_as_two_versions(a.store, work)
        if "canary" not in a.skip:
            out["canary"] = canary_split(root, name, work, image, a.requests, a.keys, a.per_key)
            print(json.dumps(out["canary"]), file=sys.stderr)
        if "rollback" not in a.skip:
            out["rollback"] = rollback_under_load(root, name, work, image, a.clients)
            print(json.dumps(out["rollback"]), file=sys.stderr)
        if "cycles" not in a.skip:
            out["cycles"] = cycles_soak(root, name, work, image, a.cycles)
        if "shadow" not in a.skip:
            out["shadow"] = shadow_saturated(a.store, work, a.clients, a.seconds, a.rounds)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"rollout-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
