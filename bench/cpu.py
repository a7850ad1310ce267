"""Server CPU time per request: the service's processes' user+system time (from /proc) over the
requests answered in a fixed window, with raw `image/jpeg` bodies and with multipart uploads.

    python -m bench.cpu --store /tmp/peers-store-tiny --model tiny-64 --clients 32 --duration 20
    python -m bench.cpu ... --target before=/tmp/before:1 --target after=.:auto --rounds 3

Each `--target NAME=CODE:WORKERS[,SETTING=VALUE...]` is a checkout of this project (its `python -m service`, run with
its own `.venv` when it has one, else this venv), an IMGSERVE_WORKERS value and any other settings
(`after-tf=.:1,IMGSERVE_CONVERT_SAVEDMODEL=false`); the targets are
measured in turn, `--rounds` times over, so that a before/after pair shares the machine's state, and
the median of the rounds is reported.

The load comes from wrk (compiled, a separate process; its CPU is not counted). The figure is a
property of the server's code path, so it can be compared before and after a change on one machine
even while the absolute throughput moves with the noise of a shared host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.harness import DEFAULT_IMAGES, REPO
from bench.runs import WARMUP_S, Server, wrk


def measure(server: Server, image: Path, clients: int, seconds: float, multipart: bool) -> dict[str, object]:
    wrk(server.url, image, clients, WARMUP_S, multipart)
    before = server.cpu_seconds()
    res = wrk(server.url, image, clients, seconds, multipart)
    spent = server.cpu_seconds() - before
    ok = int(res["ok"])
    return {**res, "server_cpu_s": spent, "cpu_ms_per_request": spent / ok * 1e3 if ok else None,
            "server_cores_busy": spent / res["duration_s"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--target", action="append", default=[], help="NAME=CODE_DIR:WORKERS (default: this=.:1)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    image = sorted(args.images.rglob("*.jpg"))[0]
    targets = [_target(t) for t in args.target or ["this=.:1"]]
    runs: list[dict[str, object]] = []
    for rnd in range(args.rounds):
        for name, code, workers, extra in targets:
            server = Server(args.store, args.model, args.out / f"{stamp}-cpu-{name}-server.log", code=code,
                            IMGSERVE_WORKERS=workers, IMGSERVE_LOG_LEVEL="WARNING", **extra)
            try:
                for multipart in (False, True):
                    r = measure(server, image, args.clients, args.duration, multipart)
                    runs.append({"target": name, "code": str(code), "workers": workers, "settings": extra,
                                 "round": rnd + 1, **r})
                    print(f"{name:>8} round {rnd + 1} {r['body']:>9}: {r['cpu_ms_per_request']:.3f} ms server CPU "
                          f"per request, {r['images_per_s']:.0f} images/s, p50 {r['p50_ms']:.1f} ms, "
                          f"{r['server_cores_busy']:.2f} cores busy", flush=True)
            finally:
                server.stop()
    summary = {f"{n} {b}": statistics.median(float(r["cpu_ms_per_request"]) for r in runs  # type: ignore[arg-type]
                                             if r["target"] == n and r["body"] == b)
               for n, *_ in targets for b in ("raw", "multipart")}
    ratios = paired_ratios(runs, [n for n, *_ in targets], args.rounds)
    result = {"started": stamp, "command": " ".join(["python -m bench.cpu", *sys.argv[1:]]), "image": str(image),
              "median_cpu_ms_per_request": summary, "median_paired_ratio": ratios, "runs": runs}
    (args.out / f"{stamp}-cpu.json").write_text(json.dumps(result, indent=2))
    for key, value in summary.items():
        print(f"median {key}: {value:.3f} ms server CPU per request")
    for key, value in ratios.items():
        print(f"median paired ratio {key}: {value:.2f}x less CPU per request than {targets[0][0]}")
    return 0


def paired_ratios(runs: list[dict[str, object]], names: list[str], rounds: int) -> dict[str, float]:
    """For each target after the first: the median over rounds of (first target's CPU per request) / (its
    own) in the same round. The machine drifts by more than the changes measured over the minutes a run
    takes, and a round's targets run minutes apart at most, so the pairs cancel most of that drift."""
    cost = {(r["target"], r["body"], r["round"]): float(r["cpu_ms_per_request"])  # type: ignore[arg-type]
            for r in runs if r["cpu_ms_per_request"] is not None}
    out = {}
    for name in names[1:]:
        for body in ("raw", "multipart"):
            pairs = [cost[(names[0], body, k)] / cost[(name, body, k)] for k in range(1, rounds + 1)
                     if (names[0], body, k) in cost and (name, body, k) in cost]
            if pairs:
                out[f"{name} {body}"] = statistics.median(pairs)
    return out


def _target(text: str) -> tuple[str, Path, str, dict[str, str]]:
    name, _, rest = text.partition("=")
    code, _, tail = rest.rpartition(":")
    workers, *pairs = tail.split(",")
    extra = dict(pair.split("=", 1) for pair in pairs)
    return name, Path(code or ".").resolve(), workers or "1", extra


if __name__ == "__main__":
    sys.exit(main())
