"""The feedback loop, once, on clothing-small: train a version, find its weakest class on the test split,
correct up to 50 photos of that class it gets wrong (photos it never trained on, sent to a real server's
POST /v1/feedback), retrain with `--extra-data`, and compare the two versions on those photos and on the
same test split.

    python -m bench.feedback_retrain [--image-size 64] [--max-per-class 120] [--epochs 15]

The training settings are the same for both versions (same seed); only the extra photos differ.
Writes bench/results/<stamp>-feedback-retrain.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.harness import SHARED, ServerProcess, cpu_model, write_result

DATA = SHARED / "datasets" / "clothing-small"


def recall(probs: np.ndarray, y: np.ndarray, cls: int) -> float:
    mask = y == cls
    return float((probs[mask].argmax(1) == cls).mean()) if mask.any() else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-per-class", type=int, default=120)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--corrections", type=int, default=50)
    args = p.parse_args()
    from service.imaging import load_image
    from service.runtimes.tensorflow import SavedModelRuntime
    from service.store import read_metadata
    from train.pipeline import TrainConfig, run

    with tempfile.TemporaryDirectory(prefix="imgserve-bench-retrain-") as tmp:
        store, feedback = Path(tmp) / "store", Path(tmp) / "feedback"

        def train(extra: Path | None) -> Any:
            return run(TrainConfig(data=DATA, store=store, name="clothing", backbone="cnn", weights="none",
                                   image_size=args.image_size, max_per_class=args.max_per_class,
                                   head_epochs=args.epochs, patience=4, batch_size=32, workers=2, variants=False,
                                   time_budget_min=0, extra_data=extra))

        t0 = time.perf_counter()
        first = train(None)
        meta = read_metadata(first.version_dir)
        y_test = np.array([meta.labels.index(q.parent.name) for q in first.test_paths])
        recalls = {c: recall(first.test_probabilities, y_test, i) for i, c in enumerate(meta.labels)}
        weakest = min(recalls, key=recalls.__getitem__)
        cls = meta.labels.index(weakest)
        # photos of that class v1 never trained on (beyond --max-per-class) and gets wrong: the corrections
        used = set(first.test_paths)
        v1 = SavedModelRuntime(first.version_dir, meta)
        pool = [q for q in sorted((DATA / "train" / weakest).glob("*.jpg"))[args.max_per_class:] if q not in used]
        wrong: list[Path] = []
        for q in pool:
            x = load_image(q, args.image_size, args.image_size)[None]
            if int(v1.predict(x).argmax()) != cls:
                wrong.append(q)
            if len(wrong) == args.corrections:
                break
        server = ServerProcess(store, Path(tmp) / "server.log", IMGSERVE_FEEDBACK_DIR=str(feedback))
        try:
            for q in wrong:
                r = httpx.post(server.url + "/v1/feedback", files={"file": (q.name, q.read_bytes(), "image/jpeg")},
                               data={"label": weakest}, timeout=30)
                assert r.status_code == 201, r.text
        finally:
            server.stop()
        second = train(feedback / "clothing")
        x_fb = np.stack([load_image(q, args.image_size, args.image_size) for q in wrong])
        v2 = SavedModelRuntime(second.version_dir, read_metadata(second.version_dir))
        out = {
            "cpu": cpu_model(), "settings": vars(args), "weakest_class": weakest, "corrections": len(wrong),
            "recall_on_corrections": {"v1": float((v1.predict(x_fb).argmax(1) == cls).mean()),
                                      "v2": float((v2.predict(x_fb).argmax(1) == cls).mean())},
            "test_recall_weakest": {"v1": recalls[weakest],
                                    "v2": recall(second.test_probabilities, y_test, cls)},
            "test_accuracy": {"v1": first.metrics["accuracy"], "v2": second.metrics["accuracy"]},
            "test_images": int(len(y_test)),
            "report_feedback": second.metrics.get("feedback"),
            "minutes": (time.perf_counter() - t0) / 60,
        }
        assert list(second.test_paths) == list(first.test_paths), "the test split changed"
    out["test_accuracy_change_points"] = (out["test_accuracy"]["v2"] - out["test_accuracy"]["v1"]) * 100
    write_result("feedback-retrain", out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
