"""Runtimes that stand in for a model where the model is not what is measured or tested: the in-process
benchmark (`ConstantModel`, which costs nothing) and the app tests (`FakeClassifier`, whose answer
follows the image, so a test can tell one caller's answer from another's). Both follow the runtime
protocol of service/runtimes (runtime, precision, predict), and `publish_fake` writes a version for
them to serve into a store, the way train publishes one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class ConstantModel:
    """Answers the same probabilities for every row."""

    runtime, precision = "none", "fp32"

    def __init__(self, meta: Any) -> None:
        self.meta = meta
        self.row = np.full(meta.num_classes, 1.0 / meta.num_classes, np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.tile(self.row, (len(images), 1))


class FakeClassifier:
    """The class is the bucket of the image's mean red value (dark, mid, bright for three classes); records
    the size of every batch; can fail its warm-up."""

    runtime, precision = "fake", "fp32"

    def __init__(self, meta: Any, fail_warmup: bool = False) -> None:
        self.meta = meta
        self.batches: list[int] = []
        self.fail_warmup = fail_warmup

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.fail_warmup:
            raise RuntimeError("warm-up exploded")
        self.batches.append(len(images))
        k = self.meta.num_classes
        out = np.full((len(images), k), 0.1 / max(k - 1, 1), np.float32)
        for i, r in enumerate(images):
            out[i, int(r[..., 0].mean()) * k // 256] = 0.9
        return out


def publish_fake(store: Path, name: str, labels: list[str], size: int = 16, **meta: Any) -> Path:
    """Publish the next version of `name` with a placeholder SavedModel (the fake loaders never read it)."""
    from service.metadata import ModelMeta
    from service.store import publish

    def write(tmp: Path) -> None:
        (tmp / "saved_model.pb").write_bytes(b"fake")

    return publish(store, name, write, ModelMeta.create(labels=labels, size=(size, size), backbone="fake", **meta))
