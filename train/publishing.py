"""Publishing: model.json's metadata, the SavedModel, its OpenVINO variants and the report, written into
a hidden folder that the store renames into place as the new version (service/store.py `publish`)."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service import store
from service.metadata import ModelMeta
from service.quality import reference_from
from train import report, stopping
from train.budget import Budget, Plan, peak_rss_bytes, release_memory
from train.config import TrainConfig
from train.evaluation import Evaluation
from train.fitting import Fitted
from train.model import export_saved_model
from train.precision import device_description
from train.splits import Data

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the run made and measured, for the metadata and the report."""

    cfg: TrainConfig
    name: str
    data: Data
    evaluation: Evaluation
    fitted: Fitted
    plan: Plan
    budget: Budget
    timings: dict[str, float]
    cache: bool  # trained on cached features

    @property
    def metrics(self) -> dict[str, Any]:
        return self.evaluation.metrics


def build_metadata(out: Outcome, comparison: dict[str, Any] | None = None) -> ModelMeta:
    cfg, data = out.cfg, out.data
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "extra_metadata"}
    training.update(cache_features=out.cache, device=device_description(), tensorflow=tf.__version__,
                    plan=out.plan.document())
    extra: dict[str, Any] = {**({"comparison": comparison} if comparison else {}), **cfg.extra_metadata}
    ds = data.full
    return ModelMeta.create(
        name=out.name, labels=data.classes, size=(cfg.image_size, cfg.image_size), backbone=cfg.backbone,
        weights=cfg.weights,
        metrics={key: out.metrics[key] for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                                   "test_images")},
        dataset={"source": str(cfg.data), "presplit": ds.presplit, "class_counts": ds.class_counts(),
                 "skipped_files": len(ds.skipped), "content_sha256": data.content_hash,
                 **({"extra": {"source": str(data.extra.root), "per_class": data.extra.per_class}}
                    if data.extra is not None else {})},
        training=training, reference=reference_from(out.evaluation.probs), **extra,
    )


def variants_for(version_dir: Path, meta: ModelMeta, out: Outcome) -> tuple[dict[str, Any], list[str]]:
    """The optimized variants, written into the version folder before model.json, and the report's lines
    about them; nothing when switched off or not installed. They are scored on the plan's sample of the
    test images (all of them when the budget allows)."""
    cfg, ev = out.cfg, out.evaluation
    if not cfg.variants:
        return {}, []
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        logger.warning("no OpenVINO variants: the openvino and nncf packages are not installed")
        return {}, []
    from train.optimize import variant_metadata

    release_memory()
    rows = np.sort(np.random.default_rng(cfg.seed).permutation(len(ev.y))[:out.plan.variant_images])
    calibration = out.data.images("train", out.plan.calibration_images, cfg.seed)
    return variant_metadata(version_dir, meta, calibration, out.data.test_images(ev.paths, rows), ev.y[rows],
                            len(calibration), cfg.seed, ev.probs[rows])


def _test_images(out: Outcome, rows: np.ndarray) -> np.ndarray:
    """The decoded test images at `rows` (for the report's plots)."""
    return np.asarray(out.data.test_images(out.evaluation.paths, np.asarray(rows, dtype=np.int64))[:])


def write_plots(rep: Path, out: Outcome) -> list[dict[str, Any]]:
    """The report's plots; returns the most confused pairs they show."""
    metrics, classes, y = out.metrics, out.data.classes, out.evaluation.y
    pred = out.evaluation.probs.argmax(axis=1)
    report.plot_history(out.fitted.histories, rep / "history.png")
    report.plot_confusion(metrics["confusion_matrix"], classes, rep / "confusion_matrix.png")
    report.plot_reliability(metrics["calibration"], rep / "reliability.png")
    shown = np.arange(min(16, len(pred)))
    report.plot_samples(_test_images(out, shown), y[shown], pred[shown], classes, rep / "samples.png")
    pairs = report.confused_pairs(metrics["confusion_matrix"], classes)
    examples = {(p["true"], p["predicted"]): np.flatnonzero((y == classes.index(p["true"]))
                                                            & (pred == classes.index(p["predicted"])))[:4]
                for p in pairs}
    report.plot_confused_pairs(pairs, {key: _test_images(out, rows) for key, rows in examples.items()},
                               rep / "confused_pairs.png")
    return pairs


def run_info(out: Outcome) -> dict[str, Any]:
    cfg, fitted = out.cfg, out.fitted
    return {"peak_rss_bytes": peak_rss_bytes(), "minutes": (time.perf_counter() - out.budget.start) / 60,
            "time_budget_min": cfg.time_budget_min, "stopped_by_budget": out.budget.stopped,
            "epochs": {name: p.epochs for name, p in fitted.phases.items()},
            "undone": [name for name, p in fitted.phases.items() if p.undone],
            "cache": fitted.cache, "precision": cfg.precision, "plan": out.plan.document(),
            "images": {"train": len(out.data.source.train), "validation": len(out.data.source.validation),
                       "test": len(out.evaluation.y)},
            "device": device_description(), "label_smoothing": cfg.label_smoothing,
            "ema_momentum": cfg.ema_momentum, "head_epochs": cfg.head_epochs, "dropout": cfg.dropout,
            "class_weights": cfg.class_weights, "augment_copies": cfg.augment_copies,
            "fine_tune_from": cfg.fine_tune_from, "fine_tune_learning_rate": cfg.fine_tune_learning_rate}


def publish(out: Outcome, meta: ModelMeta, serving: keras.Model) -> Path:
    """Export, variants, report; the version appears in the store only once all of it is written. The
    report's `total` is the whole run's time, up to the report itself."""
    cfg = out.cfg

    def write(tmp: Path) -> dict[str, Any]:
        t = time.perf_counter()
        export_saved_model(serving, tmp, cfg.image_size, cfg.image_size)
        out.timings["export"] = time.perf_counter() - t
        t = time.perf_counter()
        measured, variant_lines = variants_for(tmp, meta, out)
        out.timings["variants"] = time.perf_counter() - t
        rep = tmp / "report"
        rep.mkdir()
        t = time.perf_counter()
        pairs = write_plots(rep, out)
        out.timings["report"] = time.perf_counter() - t
        out.timings["total"] = time.perf_counter() - out.budget.start
        report.write_report(rep, {"name": meta.name, "backbone": cfg.backbone, "weights": cfg.weights,
                                  "input": meta.input.model_dump(), "labels": out.data.classes,
                                  "metrics": out.metrics, "history": out.fitted.histories,
                                  "timings_s": out.timings, "run": run_info(out), "confused_pairs": pairs,
                                  "skipped_files": out.data.source.skipped,
                                  "variants": measured.get("variants", []), "markdown": variant_lines})
        stopping.check()  # the last point before the version is renamed into place
        return measured

    cfg.store.mkdir(parents=True, exist_ok=True)
    return store.publish(cfg.store, meta.name, write, meta)
