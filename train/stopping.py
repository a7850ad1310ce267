"""Ctrl-C and SIGTERM for a training run, acted on only where the run can unwind cleanly.

A KeyboardInterrupt raised from a signal handler lands on whatever bytecode runs next, and that
includes Python that TensorFlow calls from C++ (tf.nest's flatten imports a module): there it came back
as a SystemError that TensorFlow printed and swallowed, and the run went on to publish a version as if
it had never been asked to stop (1 run in 3 when the signal came as the head phase began). So the
handler only notes the signal, and `check()` raises KeyboardInterrupt where the run can unwind: between
batches (`StopOnSignal`), between chunks of images, and before the version is renamed into place. A
second signal raises at once, wherever the run is.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import keras

_received: list[int] = []


def _note(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if len(_received) > 1:  # asked twice: stop now
        raise KeyboardInterrupt(f"signal {signum}")


def install() -> None:
    """SIGINT and SIGTERM stop the run at its next safe point (main thread only)."""
    _received.clear()
    signal.signal(signal.SIGTERM, _note)
    signal.signal(signal.SIGINT, _note)  # even when started in the background, where SIGINT is ignored


def requested() -> bool:
    return bool(_received)


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for."""
    if _received:
        raise KeyboardInterrupt(f"signal {_received[0]}")


class StopOnSignal(keras.callbacks.Callback):
    """Raises between batches once a stop was asked for (fit, evaluate and predict)."""

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        check()

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        check()

    def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        check()
