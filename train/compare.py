"""The promotion gate's evidence: the version serving before this run (the newest published one of the same
model) scored on this run's test split, with the same decoder, so the service can compare like with like
(service/rollout.py `gate`). Written into the new version's model.json (`comparison`) and its report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service import store

logger = logging.getLogger(__name__)


def previous_version(root: Path, name: str) -> Path | None:
    """The newest complete version of `name` already in the store, if any."""
    for v in sorted(store.list_versions(root, name), reverse=True):
        path = store.version_dir(root, name, v)
        if (path / store.METADATA_FILE).is_file():
            return path
    return None


def compare_with_previous(root: Path, name: str, labels: list[str], test_images: Any, y_test: np.ndarray,
                          accuracy: float, batch: int = 64) -> dict[str, Any] | None:
    """{accuracy, baseline_accuracy, baseline_version, test_images} or, when there is nothing to compare
    with or it cannot be compared (other classes, other input), {reason} (None with no earlier version)."""
    path = previous_version(root, name)
    if path is None:
        return None
    try:
        meta = store.read_metadata(path)
    except store.StoreError as exc:
        return {"reason": f"version {path.name} could not be read: {exc}"}
    if meta.labels != labels:
        return {"baseline_version": meta.version, "reason": "other classes than this run's: not comparable"}
    from service.runtimes.tensorflow import SavedModelRuntime

    try:
        runtime = SavedModelRuntime(path, meta)
    except Exception as exc:  # a version another tool published may not load here
        return {"baseline_version": meta.version, "reason": f"could not be loaded: {exc.__class__.__name__}: {exc}"}
    h, w = meta.input.height, meta.input.width
    hits = 0
    for i in range(0, len(y_test), batch):
        x = np.asarray(test_images[i : i + batch])
        if x.shape[1:3] != (h, w):
            import cv2

            x = np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) for img in x])
        hits += int((runtime.predict(x).argmax(1) == y_test[i : i + batch]).sum())
    baseline = hits / max(len(y_test), 1)
    logger.info("version %d of %s scores %.4f on this run's %d test images (this run: %.4f)", meta.version, name,
                baseline, len(y_test), accuracy)
    return {"accuracy": float(accuracy), "baseline_accuracy": float(baseline), "baseline_version": meta.version,
            "test_images": int(len(y_test))}
