"""The served model on the test split: accuracy, F1, calibration and the answers the later stages use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from train import data as dataset
from train import report
from train.compare import feedback_change
from train.config import TrainConfig
from train.splits import Data

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """The metrics, and the served model's answers (`probs`) for the test images at `paths`, labels `y`."""

    metrics: dict[str, Any]
    probs: np.ndarray
    y: np.ndarray
    paths: list[Path]


def evaluate(serving: keras.Model, data: Data, cfg: TrainConfig) -> Evaluation:
    """The served model on the test split, a chunk at a time; with `measure_flip_tta`, also the accuracy
    of the average with the mirror image (flip test-time augmentation), which doubles the evaluation."""
    probs, flipped, labels, paths = [], [], [], []
    mirror = cfg.measure_flip_tta and not cfg.flip_tta  # a served flip average sees the mirror image already
    for x, y, chunk_paths in data.chunks("test"):
        paths.extend(chunk_paths)
        probs.append(np.asarray(serving.predict(x, batch_size=cfg.batch_size, verbose=0)))
        if mirror:
            flipped.append(np.asarray(serving.predict(x[:, :, ::-1], batch_size=cfg.batch_size, verbose=0)))
        labels.append(y)
    if not labels:
        raise dataset.DatasetError("after skipping undecodable files the test split is empty")
    p, y_te = np.concatenate(probs), np.concatenate(labels)
    metrics = report.classification_metrics(y_te, p.argmax(axis=1), data.classes)
    metrics["calibration"] = report.calibration(y_te, p)
    metrics["flip_tta_served"] = cfg.flip_tta
    if len(data.source.test) < len(data.full.test):
        metrics["test_sample_of"] = len(data.full.test)
    if mirror or cfg.flip_tta:
        both = 0.5 * (p + np.concatenate(flipped)) if mirror else p
        metrics["flip_tta_accuracy"] = float((both.argmax(axis=1) == y_te).mean())
    logger.info("test accuracy %.3f, macro F1 %.3f, ECE %.3f on %d images%s", metrics["accuracy"],
                metrics["macro_f1"], metrics["calibration"]["ece"], len(y_te),
                f" (with the mirror image averaged in: {metrics['flip_tta_accuracy']:.3f})" if mirror else "")
    return Evaluation(metrics, p, y_te, paths)


def score_extra(serving: keras.Model, data: Data, cfg: TrainConfig, name: str) -> dict[str, Any]:
    """How the extra photos (feedback) are answered now and by the version before: the report's evidence that
    the corrections were learnt."""
    assert data.extra is not None
    x, y, _ = dataset.load_split(data.extra.split, cfg.image_size, cfg.image_size, [], cfg.workers)
    accuracy = float((np.asarray(serving.predict(x, batch_size=cfg.batch_size, verbose=0)).argmax(1) == y).mean())
    out = feedback_change(cfg.store, name, data.classes, x, y, accuracy, data.extra.per_class)
    out["left_out_in_held_out_splits"] = data.extra.held_out
    logger.info("extra photos: accuracy %.3f now%s", accuracy, f", {out['baseline_accuracy']:.3f} with version "
                f"{out['baseline_version']}" if "baseline_accuracy" in out else "")
    return out
