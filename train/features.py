"""The CPU strategy for chain-shaped backbones (VGG16): the frozen prefix runs once per image (plus
augmented copies), its outputs go to an on-disk cache (train/cache.py), and both phases train on them,
so an epoch costs the top block and head only and resident memory does not grow with the dataset.

1. `cache_features`: the prefix over the training images and their copies, and the validation images.
2. `fit_head`: the head on the pooled output of the (still frozen) top block, computed once.
3. `fit_top_block`: the top block and head on the cached prefix outputs, as many epochs as the budget fits.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from train import data as dataset
from train.budget import Progress, release_memory
from train.cache import CachedArray, CachedBatches, FeatureCache
from train.config import TrainConfig
from train.fitting import Fitted, Fitter, Parts, onehot
from train.model import ToFloat, augmentation, split_head, split_linear
from train.splits import Data

logger = logging.getLogger(__name__)


@dataclass
class Cached:
    """The cached prefix outputs of the training rows (originals, then each augmented copy) and of the
    validation rows, with their labels."""

    train: CachedArray
    y_train: np.ndarray
    validation: CachedArray
    y_validation: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.train) + len(self.validation)


def feature_batch(cfg: TrainConfig) -> int:
    """Images per backbone call: the first block's activations grow with pixels (at 224x224, 16 images
    hold about 0.6 GB of them), and past a few images a CPU gains nothing from bigger batches."""
    return max(1, min(cfg.batch_size, int(16 * (224 / cfg.image_size) ** 2)))


def prefix_models(parts: Parts, cfg: TrainConfig) -> tuple[list[keras.Model], keras.Model]:
    """The prefix (uint8 pixels in) and one augmenting copy of it per augmented copy; and the suffix."""
    prefix, suffix = split_linear(parts.base, parts.unfreeze_from or "")
    images = keras.Input(parts.input_shape, dtype="uint8")
    models = [keras.Model(images, prefix(parts.normalise(images)), name="features")]
    for copy in range(cfg.augment_copies):
        aug = augmentation(cfg.seed + 101 * copy)
        models.append(keras.Model(images, prefix(parts.normalise(aug(ToFloat()(images)))),
                                  name=f"features_{copy + 1}_augmented"))
    return models, suffix


def cache_split(cache: FeatureCache, name: str, data: Data, split: str, models: list[keras.Model],
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


def cache_key(data: Data, parts: Parts, cfg: TrainConfig) -> dict[str, Any] | None:
    """What the features depend on: a later run with `--keep-cache` and the same key reuses them."""
    if not cfg.keep_cache:
        return None
    return {"data": data.content_hash, "backbone": cfg.backbone, "weights": cfg.weights, "cut": parts.unfreeze_from,
            "size": cfg.image_size, "copies": cfg.augment_copies, "seed": cfg.seed, "max_per_class": cfg.max_per_class,
            "precision": cfg.precision, "train_images": len(data.source.train)}


def cache_features(cache: FeatureCache, models: list[keras.Model], data: Data, cfg: TrainConfig) -> Cached:
    if cache.reused:
        tr, va = cache.open("train"), cache.open("validation")
        return Cached(tr, tr.labels(), va, va.labels())
    tr, y_tr = cache_split(cache, "train", data, "train", models, cfg, len(data.source.train))
    va, y_va = cache_split(cache, "validation", data, "validation", models[:1], cfg, len(data.source.validation))
    return Cached(tr, y_tr, va, y_va)


def _pooled(model: keras.Model, rows: CachedArray, batch_size: int, what: str) -> np.ndarray:
    """`model` over every cached row, in order, kept in memory (small: pooled vectors)."""
    progress = Progress(what, len(rows))
    out = []
    for i in range(0, len(rows), batch_size):
        out.append(np.asarray(model(rows.read(i, i + batch_size), training=False)))
        progress.update(min(i + batch_size, len(rows)))
    return np.concatenate(out)


def fit_head(parts: Parts, suffix: keras.Model, cached: Cached, fit: Fitter, cfg: TrainConfig,
             k: int) -> tuple[Fitted, float]:
    """Phase 1 on pooled vectors; returns it and the estimated seconds of a phase-2 epoch (forward and
    backward through the top block for the training rows, forward for the validation rows)."""
    t = time.perf_counter()
    to_vector, from_vector = split_head(parts.head)
    pool = keras.Model(suffix.inputs[0], to_vector(suffix.outputs[0]))
    v_tr = _pooled(pool, cached.train, cfg.batch_size, "pooled features (train)")
    v_va = _pooled(pool, cached.validation, cfg.batch_size, "pooled features (validation)")
    suffix_s = (time.perf_counter() - t) / cached.rows
    vec_in = keras.Input(v_tr.shape[1:])
    head_vec = keras.Model(vec_in, from_vector(vec_in))
    epoch_s = 3.2 * suffix_s * len(cached.train) + suffix_s * len(cached.validation)
    if cfg.fine_tune_epochs > 0:  # what the ETA of phase 1 must count: phase 2 fills the budget or its epochs
        fit.budget.later_s = min(cfg.fine_tune_epochs * epoch_s, max(0.0, 0.85 * fit.budget.left()))
    phase = fit(head_vec, cfg.head_learning_rate, (v_tr, onehot(cached.y_train, k)),
                (v_va, onehot(cached.y_validation, k)), cfg.head_epochs, "head",
                share=0.15 if cfg.fine_tune_epochs > 0 else 1.0)
    fit.budget.later_s = 0.0
    return Fitted({"head": phase}), epoch_s


def plan_fine_tune(fit: Fitter, cfg: TrainConfig, epoch_s: float, train_rows: int) -> tuple[int, int | None]:
    """Phase 2's epochs (0: skipped) and, when less than one epoch fits, its batches."""
    if math.isinf(fit.budget.left()):
        return cfg.fine_tune_epochs, None
    fits = fit.budget.left() / epoch_s
    if fits < 0.1:
        logger.info("fine_tune: skipped, the time budget leaves %.0f s and an epoch takes about %.0f s",
                    fit.budget.left(), epoch_s)
        fit.budget.stopped.append("fine_tune")
        return 0, None
    if fits < 1:
        return 1, max(1, int(fits * math.ceil(train_rows / cfg.batch_size)))
    # the estimate only plans a partial epoch and logs the first ETA: once an epoch has run, BudgetStop
    # decides from its measured time (the estimate ran 35% long on a bf16 Zen 4 and ended runs early)
    return cfg.fine_tune_epochs, None


def fit_top_block(parts: Parts, suffix: keras.Model, cached: Cached, fit: Fitter, cfg: TrainConfig, k: int,
                  epoch_s: float) -> Fitted:
    """Phase 2: the top block and head on the cached prefix outputs; the budget plans the epochs."""
    epochs, batches = plan_fine_tune(fit, cfg, epoch_s, len(cached.train))
    if epochs == 0:
        return Fitted()
    logger.info("fine_tune: about %.0f s an epoch (estimated from the top block's forward pass)%s; %s", epoch_s,
                "" if batches is None else f"; {batches} batches", fit.budget.describe())
    p_in = keras.Input(cached.train.shape[1:])
    tuner = keras.Model(p_in, parts.head(suffix(p_in, training=False)))
    train = CachedBatches(cached.train, cached.y_train, k, cfg.batch_size, shuffle=True, seed=cfg.seed,
                          class_weight=fit.class_weight, max_batches=batches)
    val = CachedBatches(cached.validation, cached.y_validation, k, cfg.batch_size, shuffle=False)
    return Fitted({"fine_tune": fit(tuner, cfg.fine_tune_learning_rate, train, val, epochs, "fine_tune")})


def fit_on_cached_features(parts: Parts, data: Data, fit: Fitter, cfg: TrainConfig) -> Fitted:
    """The three steps of the module docstring, in one feature cache that is removed at the end unless kept."""
    k = len(data.classes)
    t = time.perf_counter()
    models, suffix = prefix_models(parts, cfg)
    with FeatureCache(cfg.cache_dir, cfg.cache_dtype, cfg.keep_cache, cache_key(data, parts, cfg)) as cache:
        cached = cache_features(cache, models, data, cfg)
        features_s = time.perf_counter() - t
        info = {"folder": str(cache.kept_as or cache.root), "bytes": cache.size_bytes(), "dtype": cfg.cache_dtype,
                "rows": cached.rows, "kept": cfg.keep_cache, "reused": cache.reused}
        release_memory()
        logger.info("features done in %.0f s (%.0f ms an image); %s", features_s,
                    1000 * features_s / cached.rows, fit.budget.describe())
        head, epoch_s = fit_head(parts, suffix, cached, fit, cfg, k)
        tuned = fit_top_block(parts, suffix, cached, fit, cfg, k, epoch_s) if cfg.fine_tune_epochs > 0 else Fitted()
    return Fitted({**head.phases, **tuned.phases}, features_s=features_s, cache=info)
