"""The in-process limit: the published model called directly (no HTTP) at batch sizes 1..64 on images
decoded by the service's own decoder, from one thread and then (at the sizes the service mostly runs)
from two threads at once, as the service does with two batches in flight. The limit is the best of
all of them. Prints one JSON object.

    python -m bench.limit VERSION_DIR IMAGES MAX_BATCH REPEATS [SIZES|all] [RUNTIME]

RUNTIME is `tensorflow-fp32` (the SavedModel, default) or a variant's key, e.g. `openvino-int8`;
`openvino-fp32` on a version without that variant is its SavedModel converted as the service does."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np


def runtime_for(version_dir: Path, key: str, threads: int = 0) -> tuple[object, str]:
    """The runtime `key` of a version, as the service would load it, and its device in words."""
    from service.store import read_metadata

    meta = read_metadata(version_dir)
    if key == "tensorflow-fp32":
        from service.runtimes.tensorflow import SavedModelRuntime
        from service.runtimes.tensorflow import configure as configure_tensorflow

        device = configure_tensorflow(threads)
        return SavedModelRuntime(version_dir, meta), device
    from service.runtimes.openvino import OpenVINORuntime, describe

    variant = next((v for v in meta.variants if v.key == key), None)
    if variant is None and key == "openvino-fp32":  # what the service serves for a SavedModel-only version
        return OpenVINORuntime.converted(version_dir, meta, threads), describe() + ", the SavedModel converted at load"
    if variant is None:
        raise SystemExit(f"{version_dir} has no variant {key}; it has {[v.key for v in meta.variants]}")
    return OpenVINORuntime(version_dir, meta, variant, threads), describe()


def main() -> int:
    version_dir, images_dir = Path(sys.argv[1]), Path(sys.argv[2])
    max_batch, repeats = int(sys.argv[3]), int(sys.argv[4])
    sizes = sys.argv[5] if len(sys.argv) > 5 else "all"
    only = None if sizes == "all" else {int(x) for x in sizes.split(",")}  # measure just these sizes
    key = sys.argv[6] if len(sys.argv) > 6 else "tensorflow-fp32"
    clf, device = runtime_for(version_dir, key)
    h, w = clf.meta.input.height, clf.meta.input.width
    from service.imaging import load_image

    files = sorted(images_dir.rglob("*.jpg"))[:max_batch]
    t = time.perf_counter()
    decoded = [load_image(f, h, w) for f in files]
    decode_ms = (time.perf_counter() - t) / len(files) * 1e3
    while len(decoded) < max_batch:
        decoded += decoded[: max_batch - len(decoded)]
    batch = np.stack(decoded)
    rows = []
    n = 1
    while n <= max_batch:
        if only is not None and n not in only:
            n *= 2
            continue
        x = batch[:n]
        t = time.perf_counter()
        clf.predict(x)
        first_ms = (time.perf_counter() - t) * 1e3
        reps = max(1, repeats if n <= 8 else max(1, repeats // 2))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            clf.predict(x)
            times.append(time.perf_counter() - t)
        best = float(np.median(times))
        rows.append({"batch_size": n, "latency_ms": best * 1e3, "first_call_ms": first_ms,
                     "images_per_s": n / best})
        n *= 2
    for n in (4, 8, 16):
        if n > max_batch or (only is not None and n not in only):
            continue
        x = batch[:n]
        reps = max(2, repeats)
        barrier = threading.Barrier(2)

        def caller(x: np.ndarray = x, reps: int = reps, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            for _ in range(reps):
                clf.predict(x)

        threads = [threading.Thread(target=caller) for _ in range(2)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t
        rows.append({"batch_size": n, "callers": 2, "latency_ms": elapsed / reps * 1e3, "first_call_ms": None,
                     "images_per_s": 2 * reps * n / elapsed})
    top = max(rows, key=lambda r: r["images_per_s"])
    print(json.dumps({"runtime": key, "device": device, "decode_ms_per_image": decode_ms, "batches": rows,
                      "best_batch_size": top["batch_size"], "best_callers": top.get("callers", 1),
                      "best_images_per_s": top["images_per_s"],
                      "batch1_latency_ms": rows[0]["latency_ms"] if rows[0]["batch_size"] == 1 else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
