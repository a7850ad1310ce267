"""What a run may spend: its time budget, the plan made up front to fit it, and the memory helpers.

The plan is made before any image goes through the backbone, from the split sizes and the backbone's
measured time an image (`measure_s_per_image`). When the whole run would not fit `--time-budget-min`,
it cuts, for the features, the validation images to a share of their time, then the augmented copies,
then the training images (a seeded sample per class); and for what follows training, the test images
the variants are scored on, then those the served model is evaluated on, then the int8 calibration
images. It logs what it cut and why before the run starts. Then `BudgetStop` fits the epochs to the
time that is really left, measured epoch by epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import keras

from train import stopping
from train.config import TrainConfig

logger = logging.getLogger(__name__)

# Shares of the budget (after the fixed costs): the features (the backbone's prefix over every training
# and validation image) may take at most FEATURES_SHARE, evaluation and the variants at most AFTER_SHARE;
# the two training phases get the rest, never less than a third.
FEATURES_SHARE = 0.40
AFTER_SHARE = 0.25
# Costs that do not grow with the images but with the model: exporting it and the report's plots, and
# converting it to OpenVINO and setting up int8 calibration, scaled from VGG16's (about 20 s and 30 s on a
# 2-core Zen 3); a small CNN's are a few seconds.
VGG16_PARAMS = 14_700_000


def fixed_s(params: int) -> float:
    """Export and report: seconds, for a model of `params` parameters."""
    return 5 + 15 * params / VGG16_PARAMS


def conversion_s(params: int) -> float:
    """OpenVINO conversion and the int8 calibration's set-up: seconds, for `params` parameters."""
    return 8 + 22 * params / VGG16_PARAMS


# floors below which a sample says too little: per class for training, in all for testing
MIN_TRAIN_PER_CLASS = 20
MIN_VALIDATION_IMAGES = 300
VALIDATION_SHARE = 0.15  # of the features' time, at most, for the validation images
MIN_TEST_IMAGES = 500
MIN_VARIANT_IMAGES = 200
MIN_CALIBRATION_IMAGES = 100


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


@dataclass(frozen=True)
class Sizes:
    """Images per split, classes (for the per-class floor of a training sample) and the model's size."""

    train: int
    validation: int
    test: int
    classes: int
    params: int = VGG16_PARAMS


@dataclass(frozen=True)
class Plan:
    """What the run will process, decided before it starts; `estimate_s` is the planner's forecast of each
    stage that does not depend on the epochs, and `notes` say in words what was cut to fit the budget."""

    copies: int
    train_images: int
    validation_images: int
    test_images: int
    variant_images: int
    calibration_images: int
    s_per_image: float
    fixed_s: float
    estimate_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def after_s(self) -> float:
        """The forecast of what follows training: kept back from the phases as the budget's reserve."""
        return sum(self.estimate_s.get(k, 0.0) for k in ("evaluation", "compare", "variants")) + self.fixed_s

    def document(self) -> dict[str, Any]:
        return {"copies": self.copies, "train_images": self.train_images,
                "validation_images": self.validation_images, "test_images": self.test_images,
                "variant_images": self.variant_images, "calibration_images": self.calibration_images,
                "ms_per_image": round(1000 * self.s_per_image, 1), "fixed_s": round(self.fixed_s, 1),
                "estimate_s": {k: round(v, 1) for k, v in self.estimate_s.items()}, "notes": self.notes}


def features_s(s: float, train: int, validation: int, copies: int, cached: bool) -> float:
    """The backbone's prefix over every training image (plus its augmented copies) and validation image."""
    return s * (train * (1 + copies) + validation) if cached else 0.0


def evaluation_s(s: float, test: int, cfg: TrainConfig) -> float:
    """The served model over the test images. Factors measured on a 2-core Zen 3 (2026-12-01): the whole
    network costs 1.3x the prefix an image, and twice that after a bfloat16 prefix (the served model is
    float32); the mirrored pass of `measure_flip_tta` doubles it."""
    full = 1.3 * s * (2.0 if cfg.precision != "float32" else 1.0)
    return (2 if cfg.measure_flip_tta and not cfg.flip_tta else 1) * test * full


def variants_s(s: float, test: int, calibration: int, cfg: TrainConfig, params: int = VGG16_PARAMS) -> float:
    """Conversion, int8 calibration and each variant over the test images (the same Zen 3 factors)."""
    return conversion_s(params) + 1.6 * calibration * s + 1.5 * test * s if cfg.variants else 0.0


def _shrink(have: int, floor: int, cost_each: float, room: float) -> int:
    """The most of `have` items at `cost_each` that fit `room`, but not below `floor` (nor above `have`)."""
    if cost_each <= 0 or have * cost_each <= room:
        return have
    return min(have, max(floor, int(room / cost_each)))


def after_s(s: float, test: int, variant_test: int, calibration: int, cfg: TrainConfig,
            previous: bool, params: int = VGG16_PARAMS) -> dict[str, float]:
    """The forecast of what follows training: evaluation, the version before scored on the same images
    (when there is one), and the variants."""
    return {"evaluation": evaluation_s(s, test, cfg), "compare": 1.3 * s * test if previous else 0.0,
            "variants": variants_s(s, variant_test, calibration, cfg, params)}


def _plan_after(sizes: Sizes, s: float, cfg: TrainConfig, previous: bool, room: float) -> tuple[int, int, int]:
    """Test images evaluated, test images the variants are scored on, calibration images: cut in that
    order of preference (the variants' sample first) until what follows training fits `room`."""
    test, variant, calibration = sizes.test, sizes.test, cfg.calibration_images

    def cost() -> float:
        return sum(after_s(s, test, variant, calibration, cfg, previous, sizes.params).values())

    if cost() > room and cfg.variants:
        variant = _shrink(variant, min(test, MIN_VARIANT_IMAGES), 1.5 * s, room - (cost() - 1.5 * s * variant))
    if cost() > room:
        each = evaluation_s(s, 1, cfg) + (1.3 * s if previous else 0.0)
        test = _shrink(test, min(test, MIN_TEST_IMAGES), each, room - (cost() - each * test))
        variant = min(variant, test)
    if cost() > room and cfg.variants:
        calibration = _shrink(calibration, MIN_CALIBRATION_IMAGES, 1.6 * s, room - (cost() - 1.6 * s * calibration))
    return test, variant, calibration


def _plan_features(sizes: Sizes, s: float, cfg: TrainConfig, cached: bool, room: float) -> tuple[int, int, int]:
    """Augmented copies, validation images (to VALIDATION_SHARE of `room`), then training images (down to a floor
    per class), until the features fit `room`."""
    copies, train = (cfg.augment_copies if cached else 0), sizes.train
    validation = sizes.validation
    if cached:
        validation = _shrink(validation, min(validation, MIN_VALIDATION_IMAGES), s, VALIDATION_SHARE * room)
    while copies > 0 and features_s(s, train, validation, copies, cached) > room:
        copies -= 1
    if features_s(s, train, validation, copies, cached) > room:
        room_train = room - features_s(s, 0, validation, copies, cached)
        train = _shrink(train, min(train, MIN_TRAIN_PER_CLASS * sizes.classes), features_s(s, 1, 0, copies, cached),
                        room_train)
    return copies, train, validation


def plan_run(sizes: Sizes, s: float, cfg: TrainConfig, cached: bool, previous: bool = False,
             spent_s: float = 0.0) -> Plan:
    """The plan for `sizes` at `s` seconds an image through the backbone (module docstring); with no
    budget, everything as asked. `spent_s`: seconds of the budget already gone (start-up, finding the
    data, building the model)."""
    copies, train, validation = (cfg.augment_copies if cached else 0), sizes.train, sizes.validation
    test, variant, calibration = sizes.test, sizes.test, cfg.calibration_images
    notes: list[str] = []
    if cfg.time_budget_min > 0:
        room = max(0.0, cfg.time_budget_min * 60 - spent_s - fixed_s(sizes.params))
        test, variant, calibration = _plan_after(sizes, s, cfg, previous, AFTER_SHARE * room)
        copies, train, validation = _plan_features(sizes, s, cfg, cached, FEATURES_SHARE * room)
        why = f"more than {FEATURES_SHARE:.0%} of the budget would go to the features"
        if cached and copies < cfg.augment_copies:
            notes.append(f"augmented copies {cfg.augment_copies} -> {copies}: {why}")
        if train < sizes.train:
            notes.append(f"training images {sizes.train} -> {train} (a seeded sample of each class): {why}")
        if validation < sizes.validation:
            notes.append(f"validation images {sizes.validation} -> {validation} (a seeded sample of each class): "
                         f"{why}")
        why = (f"evaluation{' and the variants' if cfg.variants else ''} would take more than {AFTER_SHARE:.0%} "
               "of the budget")
        if test < sizes.test:
            notes.append(f"test images {sizes.test} -> {test} (a seeded sample of each class): {why}")
        if cfg.variants and variant < test:
            notes.append(f"the variants scored on {variant} of the {test} test images (a seeded sample): {why}")
        if cfg.variants and calibration < cfg.calibration_images:
            notes.append(f"int8 calibration images {cfg.calibration_images} -> {calibration}: {why}")
    estimate = {"features": features_s(s, train, validation, copies, cached),
                **after_s(s, test, variant, calibration, cfg, previous, sizes.params)}
    return Plan(copies, train, validation, test, variant, calibration, s, fixed_s(sizes.params), estimate, notes)


def measure_s_per_image(model: keras.Model, images: Any, repeats: int = 2) -> float:
    """Seconds an image through `model`, from the faster of `repeats` passes over `images` after a
    warm-up call (the first call traces the graph)."""
    import numpy as np

    x = np.asarray(images)
    model(x[:1], training=False)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        model(x, training=False)
        best = min(best, time.perf_counter() - t)
    return best / max(1, len(x))


class Budget:
    """The run's time budget: a deadline on the monotonic clock, and what must be left for the steps
    after training (evaluation, export, variants), from the plan."""

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
