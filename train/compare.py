"""The promotion gate's evidence: the version serving before this run (the newest published one of the same
model) scored on this run's test split, with the same decoder, so the service can compare like with like
(service/rollout.py `gate`). Written into the new version's model.json (`comparison`) and its report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service import store
from service.metadata import ModelMeta

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
    try:
        baseline = accuracy_of(path, meta, test_images, y_test, batch)
    except Exception as exc:  # a version another tool published may not load here
        return {"baseline_version": meta.version, "reason": f"could not be loaded: {exc.__class__.__name__}: {exc}"}
    logger.info("version %d of %s scores %.4f on this run's %d test images (this run: %.4f)", meta.version, name,
                baseline, len(y_test), accuracy)
    return {"accuracy": float(accuracy), "baseline_accuracy": float(baseline), "baseline_version": meta.version,
            "test_images": int(len(y_test))}


def accuracy_of(path: Path, meta: ModelMeta, images: Any, labels: np.ndarray, batch: int = 64) -> float:
    """The accuracy of the version at `path` on these images (resized to its input when they differ)."""
    from service.runtimes.tensorflow import SavedModelRuntime

    runtime = SavedModelRuntime(path, meta)
    h, w = meta.input.height, meta.input.width
    hits = 0
    for i in range(0, len(labels), batch):
        x = np.asarray(images[i : i + batch])
        if x.shape[1:3] != (h, w):
            import cv2

            x = np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) for img in x])
        hits += int((runtime.predict(x).argmax(1) == labels[i : i + batch]).sum())
    return hits / max(len(labels), 1)


def feedback_change(root: Path, name: str, labels: list[str], images: np.ndarray, y: np.ndarray,
                    accuracy: float, per_class: dict[str, int]) -> dict[str, Any]:
    """The extra (feedback) photos' accuracy: this run's model, which trained on them, and the version before."""
    out: dict[str, Any] = {"photos": int(len(y)), "per_class": per_class, "accuracy": float(accuracy)}
    path = previous_version(root, name)
    if path is None:
        return out
    try:
        meta = store.read_metadata(path)
        if meta.labels != labels:
            return {**out, "baseline_version": meta.version, "reason": "other classes than this run's"}
        out.update(baseline_version=meta.version, baseline_accuracy=accuracy_of(path, meta, images, y))
    except Exception as exc:  # as in compare_with_previous: a version that cannot be scored is said so
        out.update(reason=f"version before could not be scored: {exc.__class__.__name__}: {exc}")
    return out
