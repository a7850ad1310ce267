"""A stop signal is acted on at the run's safe points, not wherever the interpreter happens to be.

Each case runs in a child interpreter: signals sent to the test process itself, with TensorFlow's
threads in it, would put the whole suite at risk."""

from __future__ import annotations

import subprocess
import sys

from bench.harness import REPO

FIRST_WAITS = """
import os, signal
from train import stopping
stopping.install()
os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before kill() returns
assert stopping.requested()
try:
    stopping.check()
except KeyboardInterrupt:
    print("check raised")
try:
    os.kill(os.getpid(), signal.SIGINT)
except KeyboardInterrupt:
    print("second raised at once")
"""

FIT_STOPS = """
import os, signal
import keras, numpy as np
from train import stopping
stopping.install()
batches = []

class SignalAtBatch3(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        batches.append(batch)
        if batch == 3:
            os.kill(os.getpid(), signal.SIGINT)

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
model.compile(optimizer="sgd", loss="mse")
try:
    model.fit(np.zeros((64, 4), np.float32), np.zeros((64, 2), np.float32), batch_size=4, epochs=3, verbose=0,
              callbacks=[SignalAtBatch3(), stopping.StopOnSignal()])
except KeyboardInterrupt:
    print("stopped after batches", batches)
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_first_signal_waits_for_check_and_the_second_raises_at_once() -> None:
    assert _run(FIRST_WAITS).split("\n")[:2] == ["check raised", "second raised at once"]


def test_fit_stops_between_batches() -> None:
    # batch 3 ran to its end, and nothing after it
    assert "stopped after batches [0, 1, 2, 3]" in _run(FIT_STOPS)
