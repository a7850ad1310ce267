"""Fitting: the two phases (a new head on the frozen backbone, then the backbone's last block with it),
as keras-io's transfer-learning examples do them, within the time budget. Each strategy returns what it
fitted (`Fitted`); train/features.py holds the CPU strategy that trains on cached backbone outputs."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from train import stopping
from train.budget import Budget, BudgetStop
from train.config import TrainConfig
from train.model import assemble, augmentation, unfreeze_index
from train.splits import Data

logger = logging.getLogger(__name__)

# `--ema-momentum auto`: chosen on clothing-small (docs/training.md, 2026-12-06 evening); the phases there
# plan 1,956 (fine-tune) and 3,260 (head) steps. 1,000 steps are five times the average's horizon.
AUTO_EMA_MOMENTUM = 0.995
AUTO_EMA_MIN_STEPS = 1000


@dataclass
class Phase:
    """One phase's record: its Keras history, wall time and epochs; `undone` when no epoch beat the phase
    before it, so its weights were put back."""

    history: dict[str, list[float]]
    seconds: float
    epochs: int
    undone: bool = False


@dataclass
class Fitted:
    """What a strategy did: its phases in order, and for the cached-features strategy, the features' time
    and the cache's description."""

    phases: dict[str, Phase] = field(default_factory=dict)
    features_s: float | None = None
    cache: dict[str, Any] | None = None

    @property
    def histories(self) -> dict[str, dict[str, list[float]]]:
        return {name: p.history for name, p in self.phases.items()}


@dataclass
class Parts:
    normalise: keras.layers.Layer
    base: keras.Model
    head: keras.Model
    input_shape: tuple[int, int, int]
    unfreeze_from: str | None


def class_weights(y: np.ndarray, k: int) -> dict[int, float]:
    """Inverse class frequency, normalised so that a balanced set has weight 1 everywhere."""
    counts = np.bincount(y, minlength=k).astype(float)
    present = counts > 0
    weights = np.where(present, len(y) / (present.sum() * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


def onehot(y: np.ndarray | None, k: int) -> np.ndarray:
    if y is None:
        raise ValueError("labels of a split that was not decoded")
    return np.asarray(keras.utils.to_categorical(y, k))


def _callbacks(patience: int, ema: bool) -> list[keras.callbacks.Callback]:
    # with a moving average, validation and the early-stopping copy of the best epoch see the average: the
    # swap comes first, so at each epoch's end the model holds it when EarlyStopping reads the weights
    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema else []
    return [
        *swap,
        stopping.StopOnSignal(),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, patience // 2),
                                          min_lr=1e-7),
    ]


def _steps(train: Any, batch_size: int) -> int:
    """Steps an epoch of `train` takes: an (x, y) pair, or a PyDataset of batches."""
    return math.ceil(len(train[0]) / batch_size) if isinstance(train, tuple) else len(train)


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


@dataclass
class Fitter:
    """Compiles and fits one phase at a time within the budget, and undoes a phase that made the
    validation loss worse than the phase before it."""

    cfg: TrainConfig
    class_weight: dict[int, float] | None
    budget: Budget
    best_val_loss: float = math.inf  # the best validation loss of the phases so far

    def ema_momentum(self, planned_steps: int) -> float:
        """The moving average's momentum for a phase (0: none); `auto` (None) only where the phase is long
        enough for the average to leave its starting weights behind."""
        if self.cfg.ema_momentum is not None:
            return self.cfg.ema_momentum
        return AUTO_EMA_MOMENTUM if planned_steps >= AUTO_EMA_MIN_STEPS else 0.0

    def __call__(self, model: keras.Model, lr: float, train: Any, val: Any, epochs: int, phase: str,
                 share: float = 1.0) -> Phase:
        """`train` and `val` are (x, one-hot y) array pairs or PyDatasets (which carry their own weights);
        `share`: the part of the budget's training time left that this phase may use."""
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=self.cfg.label_smoothing)
        momentum = self.ema_momentum(epochs * _steps(train, self.cfg.batch_size))
        ema = momentum > 0
        optimizer = keras.optimizers.Adam(lr, use_ema=ema, ema_momentum=momentum if ema else 0.99)
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
        before = model.get_weights() if math.isfinite(self.best_val_loss) else None
        t = time.perf_counter()
        logger.info("phase %s: %d epochs at most, learning rate %g%s, %s", phase, epochs, lr,
                    f", moving average of the weights at momentum {momentum:g}" if ema else "", self.budget.describe())
        callbacks = [*_callbacks(self.cfg.patience, ema), BudgetStop(self.budget, phase, epochs, share)]
        if isinstance(train, tuple):
            h = model.fit(*train, validation_data=val, epochs=epochs, batch_size=self.cfg.batch_size,
                          class_weight=self.class_weight, callbacks=callbacks, verbose=_verbose())
        else:
            h = model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=_verbose())
        history = {key: [float(v) for v in vals] for key, vals in h.history.items()}
        best = min([v for v in history.get("val_loss", []) if math.isfinite(v)] or [math.inf])
        undone = before is not None and best > self.best_val_loss
        if undone:  # no epoch of this phase beat the phase before it: keep what that phase had made
            model.set_weights(before)
            logger.info("%s: best validation loss %.4f is worse than the %.4f before it; its weights are undone",
                        phase, best, self.best_val_loss)
        self.best_val_loss = min(self.best_val_loss, best)
        return Phase(history, time.perf_counter() - t, len(history.get("loss", [])), undone)


Strategy = Callable[[Parts, Data, Fitter, TrainConfig], Fitted]


def fit_from_scratch(parts: Parts, data: Data, fit: Fitter, cfg: TrainConfig) -> Fitted:
    """The plain CNN: one phase, augmentation on every epoch."""
    k = len(data.classes)
    model = assemble(parts.normalise, parts.base, parts.head, parts.input_shape, augmentation(cfg.seed),
                     base_training=None)
    phase = fit(model, cfg.head_learning_rate, (data.x_tr, onehot(data.y_tr, k)),
                (data.x_va, onehot(data.y_va, k)), cfg.head_epochs, "train")
    return Fitted({"train": phase})


def fit_end_to_end(parts: Parts, data: Data, fit: Fitter, cfg: TrainConfig) -> Fitted:
    """The head on the frozen backbone, then the backbone from `unfreeze_from` on, augmenting every epoch."""
    k = len(data.classes)
    train, val = (data.x_tr, onehot(data.y_tr, k)), (data.x_va, onehot(data.y_va, k))
    model = assemble(parts.normalise, parts.base, parts.head, parts.input_shape, augmentation(cfg.seed))
    parts.base.trainable = False
    fitted = Fitted({"head": fit(model, cfg.head_learning_rate, train, val, cfg.head_epochs, "head")})
    if cfg.fine_tune_epochs > 0 and parts.unfreeze_from:
        start = unfreeze_index(parts.base, parts.unfreeze_from)
        parts.base.trainable = True
        for i, lyr in enumerate(parts.base.layers):
            lyr.trainable = i >= start and not isinstance(lyr, keras.layers.BatchNormalization)
        fitted.phases["fine_tune"] = fit(model, cfg.fine_tune_learning_rate, train, val, cfg.fine_tune_epochs,
                                         "fine_tune")
    return fitted
