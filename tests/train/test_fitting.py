"""The fitting stage: with `--ema-momentum`, what a phase keeps is the moving average of its weights at
the epoch with the best validation loss, not the raw weights of that epoch."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from train import fitting
from train.budget import Budget
from train.config import TrainConfig


class Trajectory(keras.callbacks.Callback):
    """The raw weights after every step (the swap to the average happens only around epochs and validation),
    folded into the moving average Keras keeps, and both as they stand at each epoch's end."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.average: list[np.ndarray] | None = None
        self.raw_at_epoch: list[list[np.ndarray]] = []
        self.average_at_epoch: list[list[np.ndarray]] = []
        self.last: list[np.ndarray] = []

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        weights = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_weights]
        m = 0.0 if self.average is None else self.momentum  # Keras: the first step's average is the weights
        self.average = [m * a + (1 - m) * w for a, w in zip(self.average or weights, weights, strict=True)]
        self.last = weights

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        assert self.average is not None
        self.raw_at_epoch.append(self.last)
        self.average_at_epoch.append(self.average)


def _phase(momentum: float, monkeypatch: pytest.MonkeyPatch) -> tuple[keras.Model, fitting.Phase, Trajectory]:
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x[:, 0] + 0.5 * rng.normal(size=256) > 0).astype(int)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    trajectory = Trajectory(momentum)
    callbacks = fitting._callbacks
    monkeypatch.setattr(fitting, "_callbacks", lambda *a: [*callbacks(*a), trajectory])
    cfg = TrainConfig(data=Path("unused"), ema_momentum=momentum, patience=20, batch_size=32,
                      label_smoothing=0.0)  # type: ignore[arg-type]
    fitter = fitting.Fitter(cfg, None, Budget(0, time.perf_counter()))
    data = (x[:192], fitting.onehot(y[:192], 2)), (x[192:], fitting.onehot(y[192:], 2))
    phase = fitter(model, 0.05, *data, epochs=6, phase="head")
    return model, phase, trajectory


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(u, v, atol=1e-5) for u, v in zip(a, b, strict=True))


def test_the_moving_average_of_the_best_epoch_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    model, phase, trajectory = _phase(0.9, monkeypatch)
    best = int(np.argmin(phase.history["val_loss"]))
    kept = [keras.ops.convert_to_numpy(v) for v in model.trainable_weights]
    assert _close(kept, trajectory.average_at_epoch[best])
    assert not _close(kept, trajectory.raw_at_epoch[best])  # the average, not that epoch's own weights
    assert len(phase.history["val_loss"]) == 6 and all(math.isfinite(v) for v in phase.history["val_loss"])


def test_without_a_moving_average_the_best_epoch_s_own_weights_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    model, phase, trajectory = _phase(0.0, monkeypatch)
    best = int(np.argmin(phase.history["val_loss"]))
    assert _close([keras.ops.convert_to_numpy(v) for v in model.trainable_weights], trajectory.raw_at_epoch[best])


def test_auto_keeps_an_average_only_for_a_phase_long_enough_to_leave_its_start_behind() -> None:
    import argparse

    from train.config import add_arguments, from_arguments

    def momentum(text: str | None, steps: int) -> float:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        argv = ["--data", "unused"] + ([] if text is None else ["--ema-momentum", text])
        cfg = from_arguments(parser.parse_args(argv))
        return fitting.Fitter(cfg, None, Budget(0, time.perf_counter())).ema_momentum(steps)

    assert momentum(None, 1956) == momentum("auto", 1956) == fitting.AUTO_EMA_MOMENTUM  # the clothing-small fine-tune
    assert momentum(None, 999) == 0.0  # a short phase (the demo, a small dataset): the raw weights
    assert momentum("0.9", 10) == 0.9 and momentum("0", 5000) == 0.0  # asked for: as asked
