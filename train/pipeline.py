"""The training run: load data, two-phase fit, evaluate, report and publish a new version."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service import store
from service.metadata import ModelMeta
from train import data as dataset
from train import report
from train.config import TrainConfig
from train.model import (
    BACKBONES,
    ToFloat,
    assemble,
    augmentation,
    build_backbone,
    build_head,
    export_saved_model,
    split_linear,
    unfreeze_index,
)

logger = logging.getLogger(__name__)

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"

__all__ = ["TrainConfig", "TrainResult", "run", "resolve_data"]


@dataclass
class TrainResult:
    version_dir: Path
    metrics: dict[str, Any]
    timings_s: dict[str, float]
    model: keras.Model
    test_paths: list[Path]
    test_probabilities: np.ndarray


def default_name(data: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", data.resolve().name.lower()).strip("-._") or "model"
    return name[:64]


def resolve_data(spec: str) -> Path:
    """A dataset folder, or `flowers`: TensorFlow's flower_photos archive, downloaded when online."""
    if spec != "flowers":
        return Path(spec)
    try:
        archive = keras.utils.get_file("flower_photos", origin=FLOWERS_URL, untar=True)
    except Exception as exc:
        raise dataset.DatasetError(
            f"could not download the flowers dataset from {FLOWERS_URL} ({exc.__class__.__name__}). "
            "This machine looks offline: pass --data DIR with one sub-folder per class instead."
        ) from exc
    root = Path(archive)
    nested = root / "flower_photos"
    return nested if nested.is_dir() else root


def device_description() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU: " + ", ".join(g.name for g in gpus)
    return "CPU (no GPU visible to TensorFlow)"


def _limit(split: dataset.Split, per_class: int | None, seed: int) -> None:
    if per_class is None:
        return
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split))
    seen: dict[int, int] = {}
    keep = []
    for i in order:
        y = split.labels[i]
        if seen.get(y, 0) < per_class:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    keep.sort()
    split.paths = [split.paths[i] for i in keep]
    split.labels = [split.labels[i] for i in keep]


def _class_weights(y: np.ndarray, k: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=k).astype(float)
    present = counts > 0
    weights = np.where(present, len(y) / (present.sum() * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


def _callbacks(patience: int) -> list[keras.callbacks.Callback]:
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, patience // 2),
                                          min_lr=1e-7),
    ]


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


class Progress:
    """Logs images done, rate and ETA every `every_s` seconds (Keras prints nothing per batch in logs)."""

    def __init__(self, what: str, total: int, every_s: float = 15.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        logger.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", self.what, done, self.total, rate, eta)


def _features(model: keras.Model, x: np.ndarray, batch_size: int, training: bool = False,
              what: str = "features") -> np.ndarray:
    """Run `model` over `x` in batches; with training=True random augmentation layers are active."""
    progress = Progress(what, len(x))
    out = []
    for i in range(0, len(x), batch_size):
        out.append(np.asarray(model(x[i : i + batch_size], training=training)))
        progress.update(min(i + batch_size, len(x)))
    return np.concatenate(out)


@dataclass
class Data:
    classes: list[str]
    x_tr: np.ndarray
    y_tr: np.ndarray
    x_va: np.ndarray
    y_va: np.ndarray
    x_te: np.ndarray
    y_te: np.ndarray
    test_paths: list[Path]
    source: dataset.Dataset


def load_data(cfg: TrainConfig) -> Data:
    """Discover, split and decode the dataset with the service's own decoder."""
    ds = dataset.discover(cfg.data, seed=cfg.seed)
    for split in (ds.train, ds.validation, ds.test):
        _limit(split, cfg.max_per_class, cfg.seed)
    if len(ds.validation) == 0 or len(ds.test) == 0:
        raise dataset.DatasetError("the dataset is too small: validation and test splits need images")
    size = cfg.image_size
    x_tr, y_tr, _ = dataset.load_split(ds.train, size, size, ds.skipped, cfg.workers)
    x_va, y_va, _ = dataset.load_split(ds.validation, size, size, ds.skipped, cfg.workers)
    x_te, y_te, test_paths = dataset.load_split(ds.test, size, size, ds.skipped, cfg.workers)
    logger.info("classes %s; images train %d, validation %d, test %d; skipped %d undecodable",
                ds.classes, len(x_tr), len(x_va), len(x_te), len(ds.skipped))
    if len(x_tr) == 0 or len(x_va) == 0 or len(x_te) == 0:
        raise dataset.DatasetError("after skipping undecodable files a split is empty")
    return Data(ds.classes, x_tr, y_tr, x_va, y_va, x_te, y_te, test_paths, ds)


@dataclass
class Fitter:
    """Compiles and fits one phase at a time, keeping each phase's history and wall time."""

    cfg: TrainConfig
    class_weight: dict[int, float]
    histories: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, model: keras.Model, lr: float, train: tuple[np.ndarray, np.ndarray],
                 val: tuple[np.ndarray, np.ndarray], epochs: int, phase: str) -> None:
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy", metrics=["accuracy"])
        t = time.perf_counter()
        logger.info("phase %s: %d epochs at most, learning rate %g", phase, epochs, lr)
        h = model.fit(*train, validation_data=val, epochs=epochs, batch_size=self.cfg.batch_size,
                      class_weight=self.class_weight, callbacks=_callbacks(self.cfg.patience), verbose=_verbose())
        self.histories[phase] = {key: [float(v) for v in vals] for key, vals in h.history.items()}
        self.timings[phase] = time.perf_counter() - t


@dataclass
class Parts:
    normalise: keras.layers.Layer
    base: keras.Model
    head: keras.Model
    input_shape: tuple[int, int, int]
    unfreeze_from: str | None


def fit_from_scratch(parts: Parts, data: Data, fit: Fitter, cfg: TrainConfig) -> None:
    """The plain CNN: one phase, augmentation on every epoch."""
    k = len(data.classes)
    model = assemble(parts.normalise, parts.base, parts.head, parts.input_shape, augmentation(cfg.seed),
                     base_training=None)
    fit(model, cfg.head_learning_rate, (data.x_tr, _onehot(data.y_tr, k)), (data.x_va, _onehot(data.y_va, k)),
        cfg.head_epochs, "train")


def fit_on_cached_features(parts: Parts, data: Data, fit: Fitter, cfg: TrainConfig) -> None:
    """CPU path for chain backbones: the frozen prefix runs once per image (plus augmented copies); both
    phases train on its cached outputs, so an epoch costs the top block and head only."""
    k = len(data.classes)
    t = time.perf_counter()
    prefix, suffix = split_linear(parts.base, parts.unfreeze_from or "")
    images = keras.Input(parts.input_shape, dtype="uint8")
    fx = keras.Model(images, prefix(parts.normalise(images)))
    fx_aug = keras.Model(images, prefix(parts.normalise(augmentation(cfg.seed)(ToFloat()(images)))))
    p_tr = [_features(fx, data.x_tr, cfg.batch_size, what="backbone features (train)")]
    for copy in range(cfg.augment_copies):
        p_tr.append(_features(fx_aug, data.x_tr, cfg.batch_size, training=True,
                              what=f"backbone features (augmented copy {copy + 1})"))
    p_tr_all = np.concatenate(p_tr)
    y_tr_all = np.concatenate([_onehot(data.y_tr, k)] * len(p_tr))
    p_va = _features(fx, data.x_va, cfg.batch_size, what="backbone features (validation)")
    val_y = _onehot(data.y_va, k)
    fit.timings["features"] = time.perf_counter() - t
    f_tr, f_va = _features(suffix, p_tr_all, cfg.batch_size), _features(suffix, p_va, cfg.batch_size)
    fit(parts.head, cfg.head_learning_rate, (f_tr, y_tr_all), (f_va, val_y), cfg.head_epochs, "head")
    del f_tr, f_va
    if cfg.fine_tune_epochs > 0:
        p_in = keras.Input(p_tr_all.shape[1:])
        tuner = keras.Model(p_in, parts.head(suffix(p_in, training=False)))
        fit(tuner, cfg.fine_tune_learning_rate, (p_tr_all, y_tr_all), (p_va, val_y), cfg.fine_tune_epochs,
            "fine_tune")


def fit_end_to_end(parts: Parts, data: Data, fit: Fitter, cfg: TrainConfig) -> None:
    """The head on the frozen backbone, then the backbone from `unfreeze_from` on, augmenting every epoch."""
    k = len(data.classes)
    train, val = (data.x_tr, _onehot(data.y_tr, k)), (data.x_va, _onehot(data.y_va, k))
    model = assemble(parts.normalise, parts.base, parts.head, parts.input_shape, augmentation(cfg.seed))
    parts.base.trainable = False
    fit(model, cfg.head_learning_rate, train, val, cfg.head_epochs, "head")
    if cfg.fine_tune_epochs > 0 and parts.unfreeze_from:
        start = unfreeze_index(parts.base, parts.unfreeze_from)
        parts.base.trainable = True
        for i, lyr in enumerate(parts.base.layers):
            lyr.trainable = i >= start and not isinstance(lyr, keras.layers.BatchNormalization)
        fit(model, cfg.fine_tune_learning_rate, train, val, cfg.fine_tune_epochs, "fine_tune")


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    return keras.utils.to_categorical(y, k)


def choose_strategy(cfg: TrainConfig) -> tuple[Any, bool]:
    spec = BACKBONES[cfg.backbone]
    if spec.application is None:
        return fit_from_scratch, False
    cache = cfg.cache_features
    if cache is None:
        cache = spec.chain and not tf.config.list_physical_devices("GPU")
    if cache and not spec.chain:
        raise ValueError(f"--cache-features needs a chain-shaped backbone; {cfg.backbone} has branches")
    return (fit_on_cached_features if cache else fit_end_to_end), bool(cache)


def evaluate(serving: keras.Model, data: Data, cfg: TrainConfig) -> tuple[dict[str, Any], np.ndarray]:
    probs = np.asarray(serving.predict(data.x_te, batch_size=cfg.batch_size, verbose=0))
    metrics = report.classification_metrics(data.y_te, probs.argmax(axis=1), data.classes)
    logger.info("test accuracy %.3f, macro F1 %.3f on %d images", metrics["accuracy"], metrics["macro_f1"],
                len(data.y_te))
    return metrics, probs


def build_metadata(cfg: TrainConfig, name: str, data: Data, metrics: dict[str, Any], cache: bool) -> ModelMeta:
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "extra_metadata"}
    training.update(cache_features=cache, device=device_description(), tensorflow=tf.__version__)
    ds = data.source
    return ModelMeta.create(
        name=name, labels=data.classes, size=(cfg.image_size, cfg.image_size), backbone=cfg.backbone,
        weights=cfg.weights,
        metrics={key: metrics[key] for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                               "test_images")},
        dataset={"source": str(cfg.data), "presplit": ds.presplit, "class_counts": ds.class_counts(),
                 "skipped_files": len(ds.skipped), "content_sha256": ds.content_hash()},
        training=training, **cfg.extra_metadata,
    )


def variants_for(version_dir: Path, meta: ModelMeta, cfg: TrainConfig, data: Data) -> tuple[dict[str, Any],
                                                                                             list[str]]:
    """The optimized variants, written into the version folder before model.json, and the report's lines
    about them; nothing when switched off or not installed."""
    if not cfg.variants:
        return {}, []
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        logger.warning("no OpenVINO variants: the openvino and nncf packages are not installed")
        return {}, []
    from train.optimize import variant_metadata

    return variant_metadata(version_dir, meta, data.x_tr, data.x_te, data.y_te, cfg.calibration_images, cfg.seed)


def publish(cfg: TrainConfig, meta: ModelMeta, serving: keras.Model, data: Data, metrics: dict[str, Any],
            probs: np.ndarray, fit: Fitter) -> Path:
    def write(tmp: Path) -> dict[str, Any]:
        export_saved_model(serving, tmp, cfg.image_size, cfg.image_size)
        t = time.perf_counter()
        measured, variant_lines = variants_for(tmp, meta, cfg, data)
        fit.timings["variants"] = time.perf_counter() - t
        rep = tmp / "report"
        rep.mkdir()
        report.plot_history(fit.histories, rep / "history.png")
        report.plot_confusion(metrics["confusion_matrix"], data.classes, rep / "confusion_matrix.png")
        report.plot_samples(data.x_te, data.y_te, probs.argmax(axis=1), data.classes, rep / "samples.png")
        report.write_report(rep, {"name": meta.name, "backbone": cfg.backbone, "weights": cfg.weights,
                                  "input": meta.input.model_dump(), "labels": data.classes, "metrics": metrics,
                                  "history": fit.histories, "timings_s": fit.timings,
                                  "skipped_files": data.source.skipped, "variants": measured.get("variants", []),
                                  "markdown": variant_lines})
        return measured

    cfg.store.mkdir(parents=True, exist_ok=True)
    return store.publish(cfg.store, meta.name, write, meta)


def run(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate and publish; returns where the new version lives."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {', '.join(BACKBONES)}")
    keras.utils.set_random_seed(cfg.seed)
    name = cfg.name or default_name(cfg.data)
    if not store.is_model_name(name):
        raise ValueError(f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    logger.info("training %s (%s, weights %s) on %s", name, cfg.backbone, cfg.weights, device_description())
    t0 = time.perf_counter()
    data = load_data(cfg)
    fit = Fitter(cfg, _class_weights(data.y_tr, len(data.classes)))
    fit.timings["load"] = time.perf_counter() - t0

    input_shape = (cfg.image_size, cfg.image_size, 3)
    base, normalise = build_backbone(cfg.backbone, input_shape, cfg.weights, batchnorm=cfg.batchnorm)
    head = build_head(tuple(base.output.shape[1:]), len(data.classes), cfg.dropout)
    parts = Parts(normalise, base, head, input_shape, cfg.fine_tune_from or BACKBONES[cfg.backbone].unfreeze_from)
    strategy, cache = choose_strategy(cfg)
    strategy(parts, data, fit, cfg)

    serving = assemble(normalise, base, head, input_shape)
    t = time.perf_counter()
    metrics, probs = evaluate(serving, data, cfg)
    fit.timings["evaluate"] = time.perf_counter() - t
    fit.timings["total"] = time.perf_counter() - t0
    meta = build_metadata(cfg, name, data, metrics, cache)
    t = time.perf_counter()
    final = publish(cfg, meta, serving, data, metrics, probs, fit)
    fit.timings["export"] = time.perf_counter() - t
    logger.info("published %s; phase times %s", final, {k2: round(v, 1) for k2, v in fit.timings.items()})
    return TrainResult(final, metrics, fit.timings, serving, data.test_paths, probs)
