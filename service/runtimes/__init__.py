"""The runtime seam: what runs a model version's forward pass.

A runtime is anything with `meta`, `runtime`, `precision` and `predict(images) -> probabilities`
(uint8 [N, H, W, 3] in, float32 [N, C] out; blocking, called off the event loop). `load` picks one
for a version from its model.json and the settings; `warmup` runs over any of them. Nothing outside
`runtimes/tensorflow.py` imports TensorFlow.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from service.metadata import ModelMeta

if TYPE_CHECKING:
    from service.settings import Settings


class ModelLoadError(Exception):
    """A version (or a variant of it) that cannot be served; the message says why."""


class Runtime(Protocol):
    meta: ModelMeta
    runtime: str  # "tensorflow", ...
    precision: str  # "fp32", "bf16", ...

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def configure(settings: Settings) -> str:
    """Process-wide set-up of the runtimes the settings may use (before any model loads); returns the
    device and precision in words, for the log and /health/ready."""
    from service.runtimes.tensorflow import configure as configure_tf

    return configure_tf(settings.intra_op_threads, settings.inter_op_threads, settings.mixed_precision)


def load(path: Path, meta: ModelMeta, settings: Settings) -> Runtime:
    """The runtime serving the version in `path`."""
    from service.runtimes.tensorflow import SavedModelRuntime

    return SavedModelRuntime(path, meta, mixed_precision=settings.mixed_precision)


def check_probabilities(probs: np.ndarray, rows: int, classes: int) -> None:
    if probs.shape != (rows, classes):
        raise ModelLoadError(f"the model returned shape {probs.shape}, expected ({rows}, {classes})")


def warmup(runtime: Runtime, batch_sizes: list[int] | tuple[int, ...], in_flight: int = 1) -> float:
    """Run one batch of each size so no request pays for first-call costs, then (with batches in
    flight) that many of the largest at once, so the memory for them is taken now and the resident
    size after warm-up is the one under load. Returns seconds spent."""
    start = time.perf_counter()
    h, w = runtime.meta.input.height, runtime.meta.input.width
    rng = np.random.default_rng(0)

    def run(images: np.ndarray) -> None:
        probs = runtime.predict(images)
        check_probabilities(probs, len(images), runtime.meta.num_classes)
        if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-2):
            raise ModelLoadError(f"warm-up at batch size {len(images)} gave probabilities that do not sum to 1")

    def batch(n: int) -> np.ndarray:  # made on this thread: a numpy Generator is not thread-safe
        return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)

    largest = max(batch_sizes, default=0)
    for n in batch_sizes:
        if n < largest or in_flight == 1:
            run(batch(n))
    if in_flight > 1 and largest:  # the largest size runs `in_flight` times at once instead of once
        with ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(run, [batch(largest) for _ in range(in_flight)]))
    return time.perf_counter() - start
