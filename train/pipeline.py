"""The training run: load data, two-phase fit, evaluate, report and publish a new version."""

from __future__ import annotations

import datetime as dt
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
from train import data as dataset
from train import report
from train.model import (
    BACKBONES,
    ToFloat,
    assemble,
    augmentation,
    build_backbone,
    build_head,
    export_saved_model,
    split_linear,
)

logger = logging.getLogger(__name__)

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
CHAIN_BACKBONES = {"vgg16"}


@dataclass
class TrainConfig:
    data: Path
    store: Path = Path("model_store")
    name: str | None = None
    backbone: str = "vgg16"
    weights: str = "imagenet"
    image_size: int = 224
    batch_size: int = 32
    head_epochs: int = 20
    fine_tune_epochs: int = 8
    fine_tune_layers: int = 4
    head_learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    dropout: float = 0.3
    patience: int = 4
    augment_copies: int = 1
    cache_features: bool | None = None
    batchnorm: bool = True
    max_per_class: int | None = None
    seed: int = 1337
    workers: int = 4
    extra_metadata: dict[str, Any] = field(default_factory=dict)


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


def run(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate and publish; returns where the new version lives."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {', '.join(BACKBONES)}")
    keras.utils.set_random_seed(cfg.seed)
    name = cfg.name or default_name(cfg.data)
    if not store.is_model_name(name):
        raise ValueError(f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    logger.info("training %s (%s, weights %s) on %s", name, cfg.backbone, cfg.weights, device_description())
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = dataset.discover(cfg.data, seed=cfg.seed)
    for split in (ds.train, ds.validation, ds.test):
        _limit(split, cfg.max_per_class, cfg.seed)
    if len(ds.validation) == 0 or len(ds.test) == 0:
        raise dataset.DatasetError("the dataset is too small: validation and test splits need images")
    size, k = cfg.image_size, len(ds.classes)
    x_tr, y_tr, _ = dataset.load_split(ds.train, size, size, ds.skipped, cfg.workers)
    x_va, y_va, _ = dataset.load_split(ds.validation, size, size, ds.skipped, cfg.workers)
    x_te, y_te, test_paths = dataset.load_split(ds.test, size, size, ds.skipped, cfg.workers)
    logger.info("classes %s; images train %d, validation %d, test %d; skipped %d undecodable",
                ds.classes, len(x_tr), len(x_va), len(x_te), len(ds.skipped))
    if len(x_tr) == 0 or len(x_va) == 0 or len(x_te) == 0:
        raise dataset.DatasetError("after skipping undecodable files a split is empty")
    timings["load"] = time.perf_counter() - t0

    input_shape = (size, size, 3)
    base, normalise = build_backbone(cfg.backbone, input_shape, cfg.weights, batchnorm=cfg.batchnorm)
    head = build_head(tuple(base.output.shape[1:]), k, cfg.dropout)
    aug = augmentation(cfg.seed)
    class_weight = _class_weights(y_tr, k)
    yoh_tr, yoh_va = keras.utils.to_categorical(y_tr, k), keras.utils.to_categorical(y_va, k)
    histories: dict[str, dict[str, list[float]]] = {}
    cache = cfg.cache_features
    if cache is None:
        cache = cfg.backbone in CHAIN_BACKBONES and not tf.config.list_physical_devices("GPU")

    def fit(model: keras.Model, lr: float, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray,
            epochs: int, phase: str) -> None:
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy", metrics=["accuracy"])
        t = time.perf_counter()
        logger.info("phase %s: %d epochs at most, learning rate %g", phase, epochs, lr)
        h = model.fit(x, y, validation_data=(xv, yv), epochs=epochs, batch_size=cfg.batch_size,
                      class_weight=class_weight, callbacks=_callbacks(cfg.patience), verbose=_verbose())
        histories[phase] = {key: [float(v) for v in vals] for key, vals in h.history.items()}
        timings[phase] = time.perf_counter() - t

    if cfg.backbone == "cnn":
        model = assemble(normalise, base, head, input_shape, aug, base_training=None)
        fit(model, cfg.head_learning_rate, x_tr, yoh_tr, x_va, yoh_va, cfg.head_epochs, "train")
    elif cache:
        # CPU path: the frozen prefix runs once per image (plus augmented copies); both phases train
        # on its cached outputs, so an epoch costs the top block and head only.
        t = time.perf_counter()
        prefix, suffix = split_linear(base, cfg.fine_tune_layers)
        images = keras.Input(input_shape, dtype="uint8")
        fx = keras.Model(images, prefix(normalise(images)))
        fx_aug = keras.Model(images, prefix(normalise(aug(ToFloat()(images)))))
        p_tr = [_features(fx, x_tr, cfg.batch_size, what="backbone features (train)")]
        for copy in range(cfg.augment_copies):
            p_tr.append(_features(fx_aug, x_tr, cfg.batch_size, training=True,
                                  what=f"backbone features (augmented copy {copy + 1})"))
        p_tr_all = np.concatenate(p_tr)
        y_tr_all = np.concatenate([yoh_tr] * len(p_tr))
        p_va = _features(fx, x_va, cfg.batch_size, what="backbone features (validation)")
        timings["features"] = time.perf_counter() - t
        f_tr, f_va = _features(suffix, p_tr_all, cfg.batch_size), _features(suffix, p_va, cfg.batch_size)
        fit(head, cfg.head_learning_rate, f_tr, y_tr_all, f_va, yoh_va, cfg.head_epochs, "head")
        del f_tr, f_va
        if cfg.fine_tune_epochs > 0:
            p_in = keras.Input(p_tr_all.shape[1:])
            tuner = keras.Model(p_in, head(suffix(p_in, training=False)))
            fit(tuner, cfg.fine_tune_learning_rate, p_tr_all, y_tr_all, p_va, yoh_va, cfg.fine_tune_epochs,
                "fine_tune")
    else:
        model = assemble(normalise, base, head, input_shape, aug)
        base.trainable = False
        fit(model, cfg.head_learning_rate, x_tr, yoh_tr, x_va, yoh_va, cfg.head_epochs, "head")
        if cfg.fine_tune_epochs > 0:
            base.trainable = True
            for lyr in base.layers[: -cfg.fine_tune_layers]:
                lyr.trainable = False
            for lyr in base.layers:
                if isinstance(lyr, keras.layers.BatchNormalization):
                    lyr.trainable = False
            fit(model, cfg.fine_tune_learning_rate, x_tr, yoh_tr, x_va, yoh_va, cfg.fine_tune_epochs, "fine_tune")

    serving = assemble(normalise, base, head, input_shape)
    t = time.perf_counter()
    probs = np.asarray(serving.predict(x_te, batch_size=cfg.batch_size, verbose=0))
    y_pred = probs.argmax(axis=1)
    metrics = report.classification_metrics(y_te, y_pred, ds.classes)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    logger.info("test accuracy %.3f, macro F1 %.3f on %d images", metrics["accuracy"], metrics["macro_f1"],
                len(y_te))

    training_settings = {k2: (str(v) if isinstance(v, Path) else v) for k2, v in asdict(cfg).items()
                         if k2 not in ("extra_metadata",)}
    training_settings["cache_features"] = cache
    training_settings["device"] = device_description()
    training_settings["tensorflow"] = tf.__version__
    meta = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "labels": ds.classes,
        "input": {"height": size, "width": size, "channels": 3, "dtype": "uint8", "color": "RGB"},
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "metrics": {key: metrics[key] for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                                 "test_images")},
        "dataset": {
            "source": str(cfg.data),
            "presplit": ds.presplit,
            "class_counts": ds.class_counts(),
            "skipped_files": len(ds.skipped),
            "content_sha256": ds.content_hash(),
        },
        "training": training_settings,
        "signature": {"name": "serving_default", "input": "images", "output": "probabilities"},
        **cfg.extra_metadata,
    }

    def write(tmp: Path) -> None:
        export_saved_model(serving, tmp, size, size)
        rep = tmp / "report"
        rep.mkdir()
        report.plot_history(histories, rep / "history.png")
        report.plot_confusion(metrics["confusion_matrix"], ds.classes, rep / "confusion_matrix.png")
        report.plot_samples(x_te, y_te, y_pred, ds.classes, rep / "samples.png")
        report.write_report(rep, {"name": name, "backbone": cfg.backbone, "weights": cfg.weights,
                                  "input": meta["input"], "labels": ds.classes, "metrics": metrics,
                                  "history": histories, "timings_s": timings, "skipped_files": ds.skipped})

    t = time.perf_counter()
    cfg.store.mkdir(parents=True, exist_ok=True)
    final = store.publish(cfg.store, name, write, meta)
    timings["export"] = time.perf_counter() - t
    logger.info("published %s; phase times %s", final, {k2: round(v, 1) for k2, v in timings.items()})
    return TrainResult(final, metrics, timings, serving, test_paths, probs)
