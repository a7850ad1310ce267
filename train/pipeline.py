"""The training run, stage by stage: find the data, plan to fit the time budget, fit, evaluate, publish.

    find_splits -> build the model -> measure the backbone -> plan_run -> sample and load the data
    -> fit (cached features on a CPU, end to end elsewhere, from scratch for the plain CNN)
    -> the served float32 model -> evaluate -> compare with the version before -> publish

Each stage is a function in its own module that returns its result: train/splits.py, train/budget.py,
train/fitting.py and train/features.py, train/evaluation.py, train/publishing.py. docs/architecture.md
follows a run through them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service import remote, store
from train import data as dataset
from train.backbones import BACKBONES
from train.budget import Budget, Plan, Sizes, measure_s_per_image, peak_rss_bytes, plan_run
from train.compare import compare_with_previous, previous_version
from train.config import TrainConfig
from train.evaluation import Evaluation, evaluate, score_extra
from train.features import fit_on_cached_features
from train.fitting import Fitted, Fitter, Parts, Strategy, class_weights, fit_end_to_end, fit_from_scratch
from train.model import assemble, build_backbone, build_head, with_flip_average
from train.precision import device_description, float32_copy, set_precision
from train.publishing import Outcome, build_metadata, publish
from train.splits import Data, find_splits, load_data, sample

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


def choose_strategy(cfg: TrainConfig) -> tuple[Strategy, bool]:
    """The strategy, and whether it caches features: the plain CNN trains from scratch; a chain-shaped
    pretrained backbone on a CPU caches its frozen prefix's outputs; anything else fits end to end."""
    spec = BACKBONES[cfg.backbone]
    if spec.application is None:
        return fit_from_scratch, False
    cache = cfg.cache_features
    if cache is None:
        cache = spec.chain and not tf.config.list_physical_devices("GPU")
    if cache and not spec.chain:
        raise ValueError(f"--cache-features needs a chain-shaped backbone; {cfg.backbone} has branches")
    return (fit_on_cached_features if cache else fit_end_to_end), bool(cache)


def build_parts(cfg: TrainConfig, num_classes: int) -> Parts:
    input_shape = (cfg.image_size, cfg.image_size, 3)
    base, normalise = build_backbone(cfg.backbone, input_shape, cfg.weights, batchnorm=cfg.batchnorm)
    head = build_head(tuple(base.output.shape[1:]), num_classes, cfg.dropout)
    return Parts(normalise, base, head, input_shape, cfg.fine_tune_from or BACKBONES[cfg.backbone].unfreeze_from)


def make_plan(cfg: TrainConfig, ds: dataset.Dataset, parts: Parts, cached: bool, previous: bool,
              budget: Budget) -> Plan:
    """Measure the backbone on a few validation images, then plan the run to fit the budget (train/budget.py);
    logs the plan, and what it cut, before any stage starts."""
    few = dataset.subset(ds.validation, 8, cfg.seed)
    x = dataset.load_split(few, cfg.image_size, cfg.image_size, [], cfg.workers)[0]
    images = keras.Input(parts.input_shape, dtype="uint8")
    s = measure_s_per_image(keras.Model(images, parts.base(parts.normalise(images))), x) if len(x) else 0.0
    sizes = Sizes(len(ds.train), len(ds.validation), len(ds.test), len(ds.classes),
                  parts.base.count_params() + parts.head.count_params())
    plan = plan_run(sizes, s, cfg, cached, previous, spent_s=time.perf_counter() - budget.start)
    logger.info("plan: %.0f ms an image through the backbone; %d training images x %d (originals and augmented "
                "copies), %d validation, %d test (variants: %d); forecast features %.0f s, evaluation %.0f s, "
                "variants %.0f s", 1000 * s, plan.train_images, 1 + plan.copies, plan.validation_images,
                plan.test_images, plan.variant_images,
                plan.estimate_s["features"], plan.estimate_s["evaluation"], plan.estimate_s["variants"])
    for note in plan.notes:
        logger.warning("plan, to fit the %g-minute budget: %s", cfg.time_budget_min, note)
    return plan


def served_model(parts: Parts, cfg: TrainConfig, num_classes: int) -> keras.Model:
    """The model that is exported: float32 whatever the training precision, with the flip average if asked."""
    serving = assemble(parts.normalise, parts.base, parts.head, parts.input_shape)
    if cfg.precision != "float32":
        serving = float32_copy(serving, cfg, num_classes)
    return with_flip_average(serving, parts.input_shape) if cfg.flip_tta else serving


def compare(cfg: TrainConfig, name: str, data: Data, ev: Evaluation) -> dict[str, Any] | None:
    """The version before on this run's test images: the gated rollout's evidence (train/compare.py)."""
    return compare_with_previous(cfg.store, name, data.classes, data.test_images(ev.paths), ev.y,
                                 ev.metrics["accuracy"])


def run(cfg: TrainConfig, started: float | None = None) -> TrainResult:
    """Train, evaluate and publish; returns where the new version lives. A store in object storage
    (`--store s3://bucket/prefix`) is staged locally (service/remote.py: its versions' metadata and the
    newest version, for the comparison), the version is made there, then uploaded, model.json last.
    `started`: when the run began on the `time.perf_counter` clock, for the time budget (the command line
    passes its own start, so that importing TensorFlow counts); by default, now."""
    started = time.perf_counter() if started is None else started
    location = str(cfg.store)
    if not remote.is_url(location):
        result = _run(cfg, started)
        return dataclasses.replace(result, published=str(result.version_dir))
    name = cfg.name or default_name(cfg.data)
    options = remote.env_options()
    with remote.staged(location, name, **options) as local:
        result = _run(dataclasses.replace(cfg, store=local, name=name), started)
        t = time.perf_counter()
        version = remote.publish_version(result.version_dir, location, name, **options)
        result.timings_s["upload"] = time.perf_counter() - t
    logger.info("uploaded %s version %d to %s in %.1fs", name, version, location, result.timings_s["upload"])
    return dataclasses.replace(result, published=f"{location.rstrip('/')}/{name}/{version}")


@dataclass
class Prepared:
    """The run's effective settings (the plan's copies and calibration images), its data and model parts."""

    cfg: TrainConfig
    data: Data
    parts: Parts
    plan: Plan


def prepare(cfg: TrainConfig, name: str, cached: bool, budget: Budget) -> Prepared:
    """Find the splits, build the model, plan, then sample and load the data as the plan says."""
    full, extra = find_splits(cfg)
    parts = build_parts(cfg, len(full.classes))
    plan = make_plan(cfg, full, parts, cached, previous_version(cfg.store, name) is not None, budget)
    ds = sample(full, plan.train_images, plan.validation_images, plan.test_images, cfg.seed, extra)
    effective = dataclasses.replace(cfg, augment_copies=plan.copies, calibration_images=plan.calibration_images)
    return Prepared(effective, load_data(effective, ds, full, extra, decode=not cached), parts, plan)


def _run(cfg: TrainConfig, started: float) -> TrainResult:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {', '.join(BACKBONES)}")
    keras.utils.set_random_seed(cfg.seed)
    name = cfg.name or default_name(cfg.data)
    if not store.is_model_name(name):
        raise ValueError(f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    budget = Budget(cfg.time_budget_min, started)
    try:
        precision = set_precision(cfg)
        strategy, cached = choose_strategy(cfg)
        logger.info("training %s (%s, weights %s) on %s, %s; %s", name, cfg.backbone, cfg.weights,
                    device_description(), precision, budget.describe())
        timings: dict[str, float] = {}
        prepared = prepare(cfg, name, cached, budget)
        timings["load"] = time.perf_counter() - budget.start
        budget.reserve_s = prepared.plan.after_s  # kept from the phases for what follows them
        fitted = fit(strategy, prepared, budget, timings)
        out = finish(prepared, name, fitted, budget, timings, cached)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    logger.info("published %s in %.1f min (%s); peak RSS %.2f GiB; phase times %s", out.version_dir,
                (time.perf_counter() - budget.start) / 60, budget.describe(), peak_rss_bytes() / 2**30,
                {k: round(v, 1) for k, v in timings.items()})
    return out


def fit(strategy: Strategy, run: Prepared, budget: Budget, timings: dict[str, float]) -> Fitted:
    cfg, data = run.cfg, run.data
    labels = np.asarray(data.source.train.labels) if data.y_tr is None else data.y_tr
    fitter = Fitter(cfg, class_weights(labels, len(data.classes)) if cfg.class_weights else None, budget)
    fitted = strategy(run.parts, data, fitter, cfg)
    if fitted.features_s is not None:
        timings["features"] = fitted.features_s
    timings.update({name: p.seconds for name, p in fitted.phases.items()})
    return fitted


def finish(run: Prepared, name: str, fitted: Fitted, budget: Budget, timings: dict[str, float],
           cached: bool) -> TrainResult:
    """Evaluate the served model, compare it with the version before, and publish it."""
    cfg, data = run.cfg, run.data
    serving = served_model(run.parts, cfg, len(data.classes))
    t = time.perf_counter()
    ev = evaluate(serving, data, cfg)
    timings["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    comparison = compare(cfg, name, data, ev)
    timings["compare"] = time.perf_counter() - t
    if comparison is not None:
        ev.metrics["comparison"] = comparison
    if data.extra is not None and len(data.extra.split):
        ev.metrics["feedback"] = score_extra(serving, data, cfg, name)
    out = Outcome(cfg, name, data, ev, fitted, run.plan, budget, timings, cached)
    final = publish(out, build_metadata(out, comparison), serving)
    return TrainResult(final, ev.metrics, timings, serving, ev.paths, ev.probs)
