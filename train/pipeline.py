"""The training run: load data, two-phase fit, evaluate, report and publish a new version."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import re
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service import remote, store
from service.cpu import cpu_has_bf16
from service.metadata import ModelMeta
from service.quality import reference_from
from train import data as dataset
from train import report, stopping
from train.cache import CachedArray, CachedBatches, FeatureCache
from train.compare import compare_with_previous, feedback_change
from train.config import TrainConfig
from train.model import (
    BACKBONES,
    ToFloat,
    assemble,
    augmentation,
    build_backbone,
    build_head,
    export_saved_model,
    split_head,
    split_linear,
    unfreeze_index,
    with_flip_average,
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
    published: str = ""  # where the version lives: its folder, or its URL in object storage


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


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise, and the next stage
    would add its own peak on top)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kibibytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _callbacks(patience: int) -> list[keras.callbacks.Callback]:
    return [
        stopping.StopOnSignal(),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, patience // 2),
                                          min_lr=1e-7),
    ]


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


class Budget:
    """The run's time budget: a deadline on the monotonic clock, and what must be left for the steps
    after training (evaluation, export, variants), estimated from the backbone's measured speed."""

    def __init__(self, minutes: float, start: float) -> None:
        self.minutes = minutes
        self.start = start
        self.deadline = start + minutes * 60 if minutes > 0 else math.inf
        self.reserve_s = 0.0
        self.later_s = 0.0  # the phases planned after the running one (for the ETA)
        self.stopped: list[str] = []

    def left(self) -> float:
        """Seconds left for training, after the reserve."""
        return self.deadline - self.reserve_s - time.perf_counter()

    def describe(self) -> str:
        if math.isinf(self.deadline):
            return "no time budget"
        return f"budget {self.minutes:g} min, {max(0.0, self.deadline - time.perf_counter()) / 60:.1f} min left"


class BudgetStop(keras.callbacks.Callback):
    """Ends a phase when its next epoch would not fit the budget, and logs each epoch's time, the
    epochs planned and an ETA for the whole run (the epochs still planned plus the reserve)."""

    def __init__(self, budget: Budget, phase: str, planned: int, share: float = 1.0) -> None:
        super().__init__()
        self.budget, self.phase, self.planned = budget, phase, planned
        self.longest = 0.0
        self.t = 0.0
        # a phase followed by another may spend only `share` of the training time left when it starts,
        # but never less than 5% of the whole budget: a cheap phase (the head) is never starved
        floor = 0.05 * budget.minutes * 60
        self.phase_end = time.perf_counter() + max(share * budget.left(), floor) if share < 1 else math.inf

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.t = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        took = time.perf_counter() - self.t
        self.longest = max(self.longest, took)
        phase_left = self.phase_end - time.perf_counter()
        left = phase_left if not math.isinf(self.phase_end) else self.budget.left()
        fits = self.planned - epoch - 1 if math.isinf(left) else min(self.planned - epoch - 1,
                                                                    int(left // self.longest))
        eta = max(0, fits) * self.longest + self.budget.later_s + self.budget.reserve_s
        logger.info("%s epoch %d/%d: %.0f s; %d more fit; the run ends in about %.1f min (%s); peak RSS %.2f GiB",
                    self.phase, epoch + 1, self.planned, took, max(0, fits), eta / 60, self.budget.describe(),
                    peak_rss_bytes() / 2**30)
        if fits <= 0 and epoch + 1 < self.planned:
            self.budget.stopped.append(self.phase)
            logger.info("%s: stopping after epoch %d, the next would not fit the time budget", self.phase, epoch + 1)
            self.model.stop_training = True


class Progress:
    """Logs images done, rate and ETA every `every_s` seconds (Keras prints nothing per batch in logs)."""

    def __init__(self, what: str, total: int, every_s: float = 15.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        stopping.check()
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        logger.info("%s: %d/%d images, %.1f images/s, ETA %.0f s; peak RSS %.2f GiB", self.what, done, self.total,
                    rate, eta, peak_rss_bytes() / 2**30)


@dataclass
class Data:
    """The dataset's splits; the pixel arrays are decoded up front only for the strategies that train on
    images (the cached-features strategy streams them a chunk at a time, and leaves them None)."""

    classes: list[str]
    source: dataset.Dataset
    size: int
    workers: int
    x_tr: np.ndarray | None = None
    y_tr: np.ndarray | None = None
    x_va: np.ndarray | None = None
    y_va: np.ndarray | None = None
    x_te: np.ndarray | None = None
    y_te: np.ndarray | None = None
    test_paths: list[Path] = field(default_factory=list)
    extra: dataset.Extra | None = None  # --extra-data: photos added to the training split

    def chunks(self, split: str, chunk: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, list[Path]]]:
        """(pixels, labels, paths) a chunk at a time: from the decoded arrays, or decoded on the fly.
        A stop signal is acted on between chunks."""
        for part in self._chunks(split, chunk):
            stopping.check()
            yield part

    def _chunks(self, split: str, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[Path]]]:
        x = getattr(self, f"x_{split[:2]}")
        if x is not None:
            y = getattr(self, f"y_{split[:2]}")
            paths = self.test_paths if split == "test" else [Path()] * len(x)
            for i in range(0, len(x), chunk):
                yield x[i : i + chunk], y[i : i + chunk], paths[i : i + chunk]
            return
        parts = {"train": "train", "validation": "validation", "test": "test"}
        yield from dataset.iter_split(getattr(self.source, parts[split]), self.size, self.size,
                                      self.source.skipped, self.workers, chunk)

    def images(self, split: str, count: int, seed: int) -> np.ndarray:
        """A seeded sample of `count` decoded images of a split (for calibration)."""
        x = getattr(self, f"x_{split[:2]}")
        if x is not None:
            pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:count])
            return np.asarray(x[pick])
        sample = dataset.subset(getattr(self.source, split), count, seed)
        return dataset.load_split(sample, self.size, self.size, [], self.workers)[0]

    def test_images(self) -> Any:
        """The test images: the decoded array, or a sequence that decodes a slice at a time."""
        if self.x_te is not None:
            return self.x_te
        return dataset.LazyImages(self.test_paths, self.size, self.size, self.workers)


def load_data(cfg: TrainConfig, decode: bool = True) -> Data:
    """Discover and split the dataset; with `decode`, decode every image with the service's own decoder."""
    ds = dataset.discover(cfg.data, seed=cfg.seed)
    for split in (ds.train, ds.validation, ds.test):
        _limit(split, cfg.max_per_class, cfg.seed)
    if len(ds.validation) == 0 or len(ds.test) == 0:
        raise dataset.DatasetError("the dataset is too small: validation and test splits need images")
    extra = dataset.add_extra(ds, cfg.extra_data) if cfg.extra_data is not None else None
    if extra is not None:
        logger.info("extra data %s: %d photos added to the training split %s; %d left out (also in the validation "
                    "or test split)", extra.root, len(extra.split), extra.per_class, extra.held_out)
    data = Data(ds.classes, ds, cfg.image_size, cfg.workers, extra=extra)
    if not decode:
        logger.info("classes %s; images train %d, validation %d, test %d (decoded as they are used)",
                    ds.classes, len(ds.train), len(ds.validation), len(ds.test))
        return data
    size = cfg.image_size
    data.x_tr, data.y_tr, _ = dataset.load_split(ds.train, size, size, ds.skipped, cfg.workers)
    data.x_va, data.y_va, _ = dataset.load_split(ds.validation, size, size, ds.skipped, cfg.workers)
    data.x_te, data.y_te, data.test_paths = dataset.load_split(ds.test, size, size, ds.skipped, cfg.workers)
    logger.info("classes %s; images train %d, validation %d, test %d; skipped %d undecodable",
                ds.classes, len(data.x_tr), len(data.x_va), len(data.x_te), len(ds.skipped))
    if len(data.x_tr) == 0 or len(data.x_va) == 0 or len(data.x_te) == 0:
        raise dataset.DatasetError("after skipping undecodable files a split is empty")
    return data


@dataclass
class Fitter:
    """Compiles and fits one phase at a time, keeping each phase's history and wall time, within the budget."""

    cfg: TrainConfig
    class_weight: dict[int, float] | None
    budget: Budget
    histories: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    best_val_loss: float = math.inf  # the best validation loss of the phases so far

    def loss(self) -> keras.losses.Loss:
        return keras.losses.CategoricalCrossentropy(label_smoothing=self.cfg.label_smoothing)

    def __call__(self, model: keras.Model, lr: float, train: Any, val: Any, epochs: int, phase: str,
                 share: float = 1.0) -> None:
        """`train` and `val` are (x, one-hot y) array pairs or PyDatasets (which carry their own weights);
        `share`: the part of the budget's training time left that this phase may use."""
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=self.loss(), metrics=["accuracy"])
        before = model.get_weights() if math.isfinite(self.best_val_loss) else None
        t = time.perf_counter()
        logger.info("phase %s: %d epochs at most, learning rate %g, %s", phase, epochs, lr, self.budget.describe())
        stop = BudgetStop(self.budget, phase, epochs, share)
        callbacks = [*_callbacks(self.cfg.patience), stop]
        if isinstance(train, tuple):
            h = model.fit(*train, validation_data=val, epochs=epochs, batch_size=self.cfg.batch_size,
                          class_weight=self.class_weight, callbacks=callbacks, verbose=_verbose())
        else:
            h = model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=_verbose())
        self.histories[phase] = {key: [float(v) for v in vals] for key, vals in h.history.items()}
        best = min([v for v in self.histories[phase].get("val_loss", []) if math.isfinite(v)] or [math.inf])
        if before is not None and best > self.best_val_loss:
            # no epoch of this phase beat the phase before it: keep what that phase had made
            model.set_weights(before)
            self.info.setdefault("undone", []).append(phase)
            logger.info("%s: best validation loss %.4f is worse than the %.4f before it; its weights are undone",
                        phase, best, self.best_val_loss)
        self.best_val_loss = min(self.best_val_loss, best)
        self.timings[phase] = time.perf_counter() - t
        self.info.setdefault("epochs", {})[phase] = len(h.history.get("loss", []))


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


def _cache_split(cache: FeatureCache, name: str, data: Data, split: str, models: list[keras.Model],
                 cfg: TrainConfig, total: int) -> tuple[CachedArray, np.ndarray]:
    """Run each model (the plain prefix, then augmenting ones) over every image of a split, a chunk of
    decoded images at a time, appending the outputs to one cached array; returns it and its labels."""
    progress = Progress(f"backbone features ({name})", total * len(models))
    labels: list[np.ndarray] = []
    writer = None
    done = 0
    try:
        for x, y, _ in data.chunks(split):
            step = feature_batch(cfg)
            for m in models:
                for i in range(0, len(x), step):
                    out = np.asarray(m(x[i : i + step], training=m.name.endswith("augmented")))
                    if writer is None:
                        writer = cache.writer(name, tuple(out.shape[1:]))
                    writer.write(out)
                labels.append(y)
                done += len(x)
                progress.update(done)
        if writer is None:
            raise dataset.DatasetError(f"after skipping undecodable files the {split} split is empty")
        y = np.concatenate(labels)
        return cache.add(name, writer.close(y)), y
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def feature_batch(cfg: TrainConfig) -> int:
    """Images per backbone call: the first block's activations grow with pixels (at 224x224, 16 images
    hold about 0.6 GB of them), and past a few images a CPU gains nothing from bigger batches."""
    return max(1, min(cfg.batch_size, int(16 * (224 / cfg.image_size) ** 2)))


def _pooled(model: keras.Model, rows: CachedArray, batch_size: int, what: str) -> np.ndarray:
    """`model` over every cached row, in order, kept in memory (small: pooled vectors)."""
    progress = Progress(what, len(rows))
    out = []
    for i in range(0, len(rows), batch_size):
        out.append(np.asarray(model(rows.read(i, i + batch_size), training=False)))
        progress.update(min(i + batch_size, len(rows)))
    return np.concatenate(out)


def fit_on_cached_features(parts: Parts, data: Data, fit: Fitter, cfg: TrainConfig) -> None:
    """CPU path for chain backbones: the frozen prefix runs once per image (plus augmented copies), its
    outputs go to an on-disk cache, and both phases train on them, so an epoch costs the top block and
    head only and resident memory does not grow with the dataset."""
    k = len(data.classes)
    t = time.perf_counter()
    prefix, suffix = split_linear(parts.base, parts.unfreeze_from or "")
    images = keras.Input(parts.input_shape, dtype="uint8")
    fx = keras.Model(images, prefix(parts.normalise(images)), name="features")
    models = [fx]
    for copy in range(cfg.augment_copies):
        aug = augmentation(cfg.seed + 101 * copy)
        models.append(keras.Model(images, prefix(parts.normalise(aug(ToFloat()(images)))),
                                  name=f"features_{copy + 1}_augmented"))
    key = None
    if cfg.keep_cache:  # what the features depend on: a later run with the same key reuses them
        key = {"data": data.source.content_hash(), "backbone": cfg.backbone, "weights": cfg.weights,
               "cut": parts.unfreeze_from, "size": cfg.image_size, "copies": cfg.augment_copies, "seed": cfg.seed,
               "max_per_class": cfg.max_per_class, "precision": cfg.precision}
    with FeatureCache(cfg.cache_dir, cfg.cache_dtype, cfg.keep_cache, key) as cache:
        if cache.reused:
            tr, va = cache.open("train"), cache.open("validation")
            y_tr, y_va = tr.labels(), va.labels()
        else:
            tr, y_tr = _cache_split(cache, "train", data, "train", models, cfg, len(data.source.train))
            va, y_va = _cache_split(cache, "validation", data, "validation", [fx], cfg, len(data.source.validation))
        data.y_tr, data.y_va = y_tr, y_va
        fit.timings["features"] = time.perf_counter() - t
        per_image = fit.timings["features"] / (len(tr) + len(va))
        if cache.reused:  # nothing was measured: assume this CPU's order of magnitude for VGG16
            per_image = 0.25 * (cfg.image_size / 224) ** 2
        fit.info["cache"] = {"folder": str(cache.kept_as or cache.root), "bytes": cache.size_bytes(),
                             "dtype": cfg.cache_dtype, "rows": len(tr) + len(va), "kept": cfg.keep_cache,
                             "reused": cache.reused}
        release_memory()
        fit.budget.reserve_s = _reserve_s(per_image, len(data.source.test), cfg)
        logger.info("features done in %.0f s (%.0f ms an image); %.0f s kept for evaluation and export; %s",
                    fit.timings["features"], 1000 * per_image, fit.budget.reserve_s, fit.budget.describe())

        # phase 1: the head, on the pooled output of the (still frozen) top block, computed once
        t = time.perf_counter()
        to_vector, from_vector = split_head(parts.head)
        pool = keras.Model(suffix.inputs, to_vector(suffix.outputs[0]))
        v_tr = _pooled(pool, tr, cfg.batch_size, "pooled features (train)")
        v_va = _pooled(pool, va, cfg.batch_size, "pooled features (validation)")
        suffix_s = (time.perf_counter() - t) / (len(tr) + len(va))
        vec_in = keras.Input(v_tr.shape[1:])
        head_vec = keras.Model(vec_in, from_vector(vec_in))
        epoch_s = 3.2 * suffix_s * len(tr) + suffix_s * len(va)  # phase 2: forward and backward, then validation
        if cfg.fine_tune_epochs > 0:  # what the ETA of phase 1 must count: phase 2 fills the budget or its epochs
            fit.budget.later_s = min(cfg.fine_tune_epochs * epoch_s, max(0.0, 0.85 * fit.budget.left()))
        fit(head_vec, cfg.head_learning_rate, (v_tr, _onehot(y_tr, k)), (v_va, _onehot(y_va, k)),
            cfg.head_epochs, "head", share=0.15 if cfg.fine_tune_epochs > 0 else 1.0)
        del v_tr, v_va
        fit.budget.later_s = 0.0
        if cfg.fine_tune_epochs <= 0:
            return
        # phase 2: the top block and head on the cached prefix outputs; the budget plans the epochs
        planned = cfg.fine_tune_epochs
        batches = None
        if not math.isinf(fit.budget.left()):
            fits = fit.budget.left() / epoch_s
            planned = max(1, min(cfg.fine_tune_epochs, int(fits)))
            if fits < 1:
                batches = max(1, int(fits * math.ceil(len(tr) / cfg.batch_size)))
                if fits < 0.1:
                    logger.info("fine_tune: skipped, the time budget leaves %.0f s and an epoch takes about %.0f s",
                                fit.budget.left(), epoch_s)
                    fit.budget.stopped.append("fine_tune")
                    return
        logger.info("fine_tune: about %.0f s an epoch (estimated from the top block's forward pass); %d epochs "
                    "planned%s; %s", epoch_s, planned, "" if batches is None else f" ({batches} batches)",
                    fit.budget.describe())
        p_in = keras.Input(tr.shape[1:])
        tuner = keras.Model(p_in, parts.head(suffix(p_in, training=False)))
        train = CachedBatches(tr, y_tr, k, cfg.batch_size, shuffle=True, seed=cfg.seed,
                              class_weight=fit.class_weight, max_batches=batches)
        val = CachedBatches(va, y_va, k, cfg.batch_size, shuffle=False)
        # the estimate only plans a partial epoch and logs the first ETA: once an epoch has run, BudgetStop
        # decides from its measured time (the estimate ran 35% long on a bf16 Zen 4 and ended runs early)
        fit(tuner, cfg.fine_tune_learning_rate, train, val, planned if batches else cfg.fine_tune_epochs,
            "fine_tune")


def _reserve_s(prefix_s_per_image: float, test_images: int, cfg: TrainConfig) -> float:
    """Seconds to keep for what follows training, from the prefix's measured time an image (decoding
    included): the test split through the whole network (twice with `measure_flip_tta`), then the
    variants: conversion, int8 calibration, and the test split through the IRs.
    Factors measured on a 2-core Zen 3 (2026-12-01): evaluation 1.3x the prefix's time an image,
    calibration 1.6x, the two IR passes 1.5x together. After a bfloat16 prefix the evaluation counts
    twice that: the served model, evaluated, is float32."""
    full = 1.3 * prefix_s_per_image * (2.0 if cfg.precision != "float32" else 1.0)
    evaluate = (2 if cfg.measure_flip_tta and not cfg.flip_tta else 1) * test_images * full
    variants = 0.0
    if cfg.variants:
        variants = 30 + 1.6 * cfg.calibration_images * prefix_s_per_image + 1.5 * test_images * prefix_s_per_image
    return 1.1 * (evaluate + variants) + 20


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


def _onehot(y: np.ndarray | None, k: int) -> np.ndarray:
    if y is None:
        raise ValueError("labels of a split that was not decoded")
    return np.asarray(keras.utils.to_categorical(y, k))


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
    """The served model on the test split, a chunk at a time; with `measure_flip_tta`, also the accuracy
    of the average with the mirror image (flip test-time augmentation), which doubles the evaluation."""
    probs, flipped, labels = [], [], []
    collect = not data.test_paths
    mirror = cfg.measure_flip_tta and not cfg.flip_tta  # a served flip average sees the mirror image already
    for x, y, paths in data.chunks("test"):
        if collect:
            data.test_paths.extend(paths)
        probs.append(np.asarray(serving.predict(x, batch_size=cfg.batch_size, verbose=0)))
        if mirror:
            flipped.append(np.asarray(serving.predict(x[:, :, ::-1], batch_size=cfg.batch_size, verbose=0)))
        labels.append(y)
    p, y_te = np.concatenate(probs), np.concatenate(labels)
    data.y_te = y_te
    if len(y_te) == 0:
        raise dataset.DatasetError("after skipping undecodable files the test split is empty")
    metrics = report.classification_metrics(y_te, p.argmax(axis=1), data.classes)
    metrics["calibration"] = report.calibration(y_te, p)
    metrics["flip_tta_served"] = cfg.flip_tta
    if mirror or cfg.flip_tta:
        both = 0.5 * (p + np.concatenate(flipped)) if mirror else p
        metrics["flip_tta_accuracy"] = float((both.argmax(axis=1) == y_te).mean())
    logger.info("test accuracy %.3f, macro F1 %.3f, ECE %.3f on %d images%s", metrics["accuracy"],
                metrics["macro_f1"], metrics["calibration"]["ece"], len(y_te),
                f" (with the mirror image averaged in: {metrics['flip_tta_accuracy']:.3f})" if mirror else "")
    return metrics, p


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


def build_metadata(cfg: TrainConfig, name: str, data: Data, metrics: dict[str, Any], cache: bool,
                   comparison: dict[str, Any] | None = None, probs: np.ndarray | None = None) -> ModelMeta:
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "extra_metadata"}
    training.update(cache_features=cache, device=device_description(), tensorflow=tf.__version__)
    extra: dict[str, Any] = {**({"comparison": comparison} if comparison else {}), **cfg.extra_metadata}
    ds = data.source
    return ModelMeta.create(
        name=name, labels=data.classes, size=(cfg.image_size, cfg.image_size), backbone=cfg.backbone,
        weights=cfg.weights,
        metrics={key: metrics[key] for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                               "test_images")},
        dataset={"source": str(cfg.data), "presplit": ds.presplit, "class_counts": ds.class_counts(),
                 "skipped_files": len(ds.skipped), "content_sha256": ds.content_hash(),
                 **({"extra": {"source": str(data.extra.root), "per_class": data.extra.per_class}}
                    if data.extra is not None else {})},
        training=training, reference=reference_from(probs) if probs is not None else None, **extra,
    )


def variants_for(version_dir: Path, meta: ModelMeta, cfg: TrainConfig, data: Data,
                 reference: np.ndarray | None = None) -> tuple[dict[str, Any], list[str]]:
    """The optimized variants, written into the version folder before model.json, and the report's lines
    about them; nothing when switched off or not installed."""
    if not cfg.variants:
        return {}, []
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        logger.warning("no OpenVINO variants: the openvino and nncf packages are not installed")
        return {}, []
    from train.optimize import variant_metadata

    release_memory()
    assert data.y_te is not None, "the test labels are always read"
    calibration = data.images("train", cfg.calibration_images, cfg.seed)
    return variant_metadata(version_dir, meta, calibration, data.test_images(), data.y_te, len(calibration),
                            cfg.seed, reference)


def publish(cfg: TrainConfig, meta: ModelMeta, serving: keras.Model, data: Data, metrics: dict[str, Any],
            probs: np.ndarray, fit: Fitter) -> Path:
    assert data.y_te is not None, "the test labels are always read"
    y_te = data.y_te

    def write(tmp: Path) -> dict[str, Any]:
        export_saved_model(serving, tmp, cfg.image_size, cfg.image_size)
        t = time.perf_counter()
        measured, variant_lines = variants_for(tmp, meta, cfg, data, probs)  # probs: the exported model's
        fit.timings["variants"] = time.perf_counter() - t
        rep = tmp / "report"
        rep.mkdir()
        pred = probs.argmax(axis=1)
        report.plot_history(fit.histories, rep / "history.png")
        report.plot_confusion(metrics["confusion_matrix"], data.classes, rep / "confusion_matrix.png")
        report.plot_reliability(metrics["calibration"], rep / "reliability.png")
        shown = np.arange(min(16, len(pred)))
        report.plot_samples(_load(data, shown), y_te[shown], pred[shown], data.classes, rep / "samples.png")
        pairs = report.confused_pairs(metrics["confusion_matrix"], data.classes)
        examples = {(p["true"], p["predicted"]): np.flatnonzero((y_te == data.classes.index(p["true"]))
                                                                & (pred == data.classes.index(p["predicted"])))[:4]
                    for p in pairs}
        report.plot_confused_pairs(pairs, {key: _load(data, rows) for key, rows in examples.items()},
                                   rep / "confused_pairs.png")
        fit.info["peak_rss_bytes"] = peak_rss_bytes()
        fit.info["minutes"] = (time.perf_counter() - fit.budget.start) / 60
        report.write_report(rep, {"name": meta.name, "backbone": cfg.backbone, "weights": cfg.weights,
                                  "input": meta.input.model_dump(), "labels": data.classes, "metrics": metrics,
                                  "history": fit.histories, "timings_s": fit.timings, "run": _run_info(cfg, fit),
                                  "confused_pairs": pairs,
                                  "skipped_files": data.source.skipped, "variants": measured.get("variants", []),
                                  "markdown": variant_lines})
        stopping.check()  # the last point before the version is renamed into place
        return measured

    cfg.store.mkdir(parents=True, exist_ok=True)
    return store.publish(cfg.store, meta.name, write, meta)


def _load(data: Data, rows: np.ndarray) -> np.ndarray:
    paths = [data.test_paths[int(i)] for i in rows]
    if data.x_te is not None:
        return np.asarray(data.x_te[np.asarray(rows, dtype=np.int64)])
    return dataset.load_split(dataset.Split(paths, [0] * len(paths)), data.size, data.size, [], data.workers)[0]


def _run_info(cfg: TrainConfig, fit: Fitter) -> dict[str, Any]:
    return {"peak_rss_bytes": fit.info.get("peak_rss_bytes"), "minutes": fit.info.get("minutes"),
            "time_budget_min": cfg.time_budget_min, "stopped_by_budget": fit.budget.stopped,
            "epochs": fit.info.get("epochs", {}), "undone": fit.info.get("undone", []),
            "cache": fit.info.get("cache"), "precision": cfg.precision,
            "device": device_description(), "label_smoothing": cfg.label_smoothing,
            "class_weights": cfg.class_weights, "augment_copies": cfg.augment_copies,
            "fine_tune_from": cfg.fine_tune_from, "fine_tune_learning_rate": cfg.fine_tune_learning_rate}


def set_precision(cfg: TrainConfig) -> str:
    """Apply --precision and say what runs it. bfloat16 is native on CPUs with AVX512_BF16 or AMX and
    on GPUs of compute capability 8.0 or newer; `auto` takes it there and float32 elsewhere."""
    native = native_bfloat16()
    if cfg.precision == "auto":
        cfg.precision = "bfloat16" if native else "float32"
    if cfg.precision == "float32":
        keras.mixed_precision.set_global_policy("float32")
        return "float32"
    if not native:
        logger.warning("--precision bfloat16 without AVX512_BF16, AMX or a recent GPU: TensorFlow emulates it, "
                       "which is slower than float32 here")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return "mixed_bfloat16" + ("" if native else " (emulated)")


def float32_copy(trained: keras.Model, cfg: TrainConfig, num_classes: int) -> keras.Model:
    """The served model in float32, with the weights trained under mixed bfloat16: the precision a
    server runs is its own choice (the OpenVINO variants, `IMGSERVE_MIXED_PRECISION`), and a bfloat16
    graph on a CPU without AVX512_BF16 would be emulated, slowly."""
    keras.mixed_precision.set_global_policy("float32")
    input_shape = (cfg.image_size, cfg.image_size, 3)
    base, normalise = build_backbone(cfg.backbone, input_shape, "none", batchnorm=cfg.batchnorm)
    head = build_head(tuple(base.output.shape[1:]), num_classes, cfg.dropout)
    served = assemble(normalise, base, head, input_shape)
    served.set_weights(trained.get_weights())
    return served


def native_bfloat16() -> bool:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return tuple(details.get("compute_capability") or (0, 0)) >= (8, 0)
    return cpu_has_bf16()


def run(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate and publish; returns where the new version lives. A store in object storage
    (`--store s3://bucket/prefix`) is staged locally (service/remote.py: its versions' metadata and the
    newest version, for the comparison), the version is made there, then uploaded, model.json last."""
    location = str(cfg.store)
    if not remote.is_url(location):
        result = _run(cfg)
        return dataclasses.replace(result, published=str(result.version_dir))
    name = cfg.name or default_name(cfg.data)
    options = remote.env_options()
    with remote.staged(location, name, **options) as local:
        result = _run(dataclasses.replace(cfg, store=local, name=name))
        t = time.perf_counter()
        version = remote.publish_version(result.version_dir, location, name, **options)
        result.timings_s["upload"] = time.perf_counter() - t
    logger.info("uploaded %s version %d to %s in %.1fs", name, version, location, result.timings_s["upload"])
    return dataclasses.replace(result, published=f"{location.rstrip('/')}/{name}/{version}")


def _run(cfg: TrainConfig) -> TrainResult:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {', '.join(BACKBONES)}")
    keras.utils.set_random_seed(cfg.seed)
    name = cfg.name or default_name(cfg.data)
    if not store.is_model_name(name):
        raise ValueError(f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    t0 = time.perf_counter()
    budget = Budget(cfg.time_budget_min, t0)
    precision = set_precision(cfg)
    strategy, cache = choose_strategy(cfg)
    logger.info("training %s (%s, weights %s) on %s, %s; %s", name, cfg.backbone, cfg.weights,
                device_description(), precision, budget.describe())
    try:
        data = load_data(cfg, decode=not cache)
        labels = np.asarray(data.source.train.labels) if data.y_tr is None else data.y_tr
        fit = Fitter(cfg, _class_weights(labels, len(data.classes)) if cfg.class_weights else None, budget)
        fit.timings["load"] = time.perf_counter() - t0

        input_shape = (cfg.image_size, cfg.image_size, 3)
        base, normalise = build_backbone(cfg.backbone, input_shape, cfg.weights, batchnorm=cfg.batchnorm)
        head = build_head(tuple(base.output.shape[1:]), len(data.classes), cfg.dropout)
        parts = Parts(normalise, base, head, input_shape,
                      cfg.fine_tune_from or BACKBONES[cfg.backbone].unfreeze_from)
        strategy(parts, data, fit, cfg)

        serving = assemble(normalise, base, head, input_shape)
        if cfg.precision != "float32":
            serving = float32_copy(serving, cfg, len(data.classes))
        if cfg.flip_tta:
            serving = with_flip_average(serving, input_shape)
        t = time.perf_counter()
        metrics, probs = evaluate(serving, data, cfg)
        fit.timings["evaluate"] = time.perf_counter() - t
        fit.timings["total"] = time.perf_counter() - t0
        t = time.perf_counter()
        assert data.y_te is not None, "the test labels are always read"
        comparison = compare_with_previous(cfg.store, name, data.classes, data.test_images(), data.y_te,
                                           metrics["accuracy"])
        fit.timings["compare"] = time.perf_counter() - t
        if comparison is not None:
            metrics["comparison"] = comparison
        if data.extra is not None and len(data.extra.split):
            metrics["feedback"] = score_extra(serving, data, cfg, name)
        meta = build_metadata(cfg, name, data, metrics, cache, comparison, probs)
        t = time.perf_counter()
        final = publish(cfg, meta, serving, data, metrics, probs, fit)
        fit.timings["export"] = time.perf_counter() - t
    finally:
        keras.mixed_precision.set_global_policy("float32")
    logger.info("published %s in %.1f min (%s); peak RSS %.2f GiB; phase times %s", final,
                (time.perf_counter() - t0) / 60, budget.describe(), peak_rss_bytes() / 2**30,
                {k2: round(v, 1) for k2, v in fit.timings.items()})
    return TrainResult(final, metrics, fit.timings, serving, data.test_paths, probs)
