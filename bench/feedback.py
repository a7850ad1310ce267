"""What feedback costs beside a prediction of the same photo, on a real server: each photo is posted to
/predict and to /v1/feedback (multipart, as the upload page sends both), by the same closed-loop clients,
the two kinds in turn and in alternating order over the rounds. Reported per kind: requests per second,
p50 and p99 latency, and the server's CPU time per request (from /proc); then feedback over prediction.

    python -m bench.feedback --store bench/.store --model bench-cnn --photos 400 --clients 1,4 --rounds 3

Every feedback request stores a new photo (distinct photos from clothing-small's train split, none sent
twice), so each one decodes, checks, writes and fsyncs a file. Writes bench/results/<stamp>-feedback.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import REPO, SHARED, ServerProcess, cpu_model, write_result

PHOTOS = SHARED / "datasets" / "clothing-small" / "train"


def closed_loop(url: str, jobs: list[tuple[str, dict[str, Any]]], clients: int) -> list[float]:
    """Each job (path, request arguments) once, by `clients` threads; the latency of each, in seconds."""
    latencies: list[float] = []
    lock = threading.Lock()
    it = iter(jobs)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                t = time.perf_counter()
                r = c.post(job[0], **job[1])
                took = time.perf_counter() - t
                assert r.status_code in (200, 201), r.text
                with lock:
                    latencies.append(took)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies


def measure(server: ServerProcess, kind: str, photos: list[tuple[bytes, str]], model: str,
            clients: int) -> dict[str, float]:
    def job(data: bytes, label: str) -> tuple[str, dict[str, Any]]:
        files = {"file": ("photo.jpg", data, "image/jpeg")}
        if kind == "predict":
            return f"/predict?model={model}", {"files": files}
        return "/v1/feedback", {"files": files, "data": {"label": label, "model": model}}

    jobs = [job(d, label) for d, label in photos]
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    lat = sorted(closed_loop(server.url, jobs, clients))
    wall, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    return {"requests": len(lat), "per_s": len(lat) / wall, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, "cpu_ms_per_request": cpu / len(lat) * 1e3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=REPO / "bench" / ".store")
    p.add_argument("--model", default="bench-cnn")
    p.add_argument("--photos", type=int, default=400, help="photos per kind, round and client count")
    p.add_argument("--clients", default="1,4")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    labels = json.loads(next((args.store / args.model).glob("*/model.json")).read_text())["labels"]
    files = sorted(PHOTOS.rglob("*.jpg"))
    client_counts = [int(c) for c in args.clients.split(",")]
    needed = args.photos * args.rounds * len(client_counts)
    if needed > len(files):
        raise SystemExit(f"{needed} distinct photos needed, {len(files)} in {PHOTOS}: fewer --photos or --rounds")
    photos = [(f.read_bytes(), labels[i % len(labels)]) for i, f in enumerate(files[:needed])]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="imgserve-bench-feedback-") as tmp:
        server = ServerProcess(args.store, Path(tmp) / "server.log", IMGSERVE_MODELS=args.model,
                               IMGSERVE_FEEDBACK_DIR=str(Path(tmp) / "feedback"))
        try:
            warm = photos[:50]
            measure(server, "predict", warm, args.model, 2)
            n = 0
            for r in range(args.rounds):
                for clients in client_counts:
                    batch = photos[n:n + args.photos]
                    n += args.photos
                    order = ("predict", "feedback") if r % 2 == 0 else ("feedback", "predict")
                    got = {kind: measure(server, kind, batch, args.model, clients) for kind in order}
                    rows.append({"round": r, "clients": clients, **{f"{k}_{m}": v for k, res in got.items()
                                                                     for m, v in res.items()}})
                    print(json.dumps(rows[-1]))
        finally:
            server.stop()
    summary = {}
    for clients in client_counts:
        mine = [row for row in rows if row["clients"] == clients]
        summary[str(clients)] = {m: statistics.median(row[f"feedback_{m}"] / row[f"predict_{m}"] for row in mine)
                                 for m in ("per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")}
    out = {"cpu": cpu_model(), "model": args.model, "photos": args.photos, "rounds": rows,
           "feedback_over_predict_median": summary}
    write_result("feedback", out)
    print(json.dumps({"feedback_over_predict_median": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
