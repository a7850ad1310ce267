"""A stop signal is acted on at the run's safe points, not wherever the interpreter happens to be."""

from __future__ import annotations

import os
import signal

import keras
import numpy as np
import pytest

from train import stopping


@pytest.fixture
def installed() -> object:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopping.install()
    yield
    stopping._received.clear()
    for s, handler in old.items():
        signal.signal(s, handler)


def test_the_first_signal_waits_for_check_and_the_second_raises_at_once(installed: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # delivered before kill() returns to Python
    assert stopping.requested()
    with pytest.raises(KeyboardInterrupt):
        stopping.check()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before kill() returns


def test_fit_stops_between_batches(installed: object) -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    batches: list[int] = []

    class SignalAtBatch3(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            batches.append(batch)
            if batch == 3:
                os.kill(os.getpid(), signal.SIGINT)

    x, y = np.zeros((64, 4), np.float32), np.zeros((64, 2), np.float32)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[SignalAtBatch3(), stopping.StopOnSignal()])
    assert batches == [0, 1, 2, 3], batches  # batch 3 ran to its end, and nothing after it
