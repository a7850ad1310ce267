"""The runtime seam: what runs a model version's forward pass.

A runtime is anything with `meta`, `runtime`, `precision` and `predict(images) -> probabilities`
(uint8 [N, H, W, 3] in, float32 [N, C] out; blocking, called off the event loop). `load` picks one
for a version from its model.json and the settings; `warmup` runs over any of them. Nothing outside
`runtimes/tensorflow.py` imports TensorFlow.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from service.cpu import cpu_has_bf16
from service.metadata import ModelMeta, Variant
from service.store import savedmodel_digest

if TYPE_CHECKING:
    from service.settings import Settings


logger = logging.getLogger(__name__)

# OpenVINO and NNCF send usage telemetry unless the user opted out in a file in their home folder: on
# `import openvino` and on every conversion, each event by forking the process. A server must neither
# report to a third party unasked nor fork while its threads run; both packages fall back to a stub
# when `openvino_telemetry` cannot be imported, and this makes it so (before any OpenVINO import:
# runtimes/openvino.py and train/optimize.py import this package first).
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


class ModelLoadError(Exception):
    """A version (or a variant of it) that cannot be served; the message says why."""


class Runtime(Protocol):
    meta: ModelMeta
    runtime: str  # "tensorflow", ...
    precision: str  # "fp32", "bf16", ...

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def tensorflow_available() -> bool:
    """TensorFlow is installed: not in the serving image, which runs the versions' OpenVINO variants."""
    return importlib.util.find_spec("tensorflow") is not None


NO_TENSORFLOW = ("this installation has no TensorFlow (the serving image): it serves versions through their "
                 "OpenVINO variants only; publish the version with variants (`python -m train optimize`), or "
                 "serve it with the full image (`pip install 'imgserve[tensorflow]'`)")


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver is loaded (checked without importing TensorFlow, which costs ~0.5 GB of memory)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


_tf_device: str | None = None


def tensorflow_device(settings: Settings) -> str:
    """Import and configure TensorFlow once, when a SavedModel is to run (or a GPU may be there)."""
    global _tf_device
    if _tf_device is None:
        from service.runtimes.tensorflow import configure as configure_tf

        _tf_device = configure_tf(settings.model_threads, settings.inter_op_threads, settings.mixed_precision)
    return _tf_device


def configure(settings: Settings) -> str:
    """Process-wide set-up of the runtimes the settings may use (before any model loads); returns the
    device and precision in words, for the log and /health/ready. TensorFlow is only imported when it
    may serve first: with IMGSERVE_RUNTIME=tensorflow, without OpenVINO, or with an NVIDIA GPU."""
    if not tensorflow_available():
        if settings.runtime == "tensorflow" or not openvino_available():
            raise ModelLoadError(f"IMGSERVE_RUNTIME={settings.runtime}: {NO_TENSORFLOW}")
        from service.runtimes.openvino import describe

        return f"CPU, OpenVINO only (no TensorFlow installed); {describe()}"
    if settings.runtime == "tensorflow" or not openvino_available() or nvidia_gpu_present():
        device = tensorflow_device(settings)
        if not device.startswith("CPU") or settings.runtime == "tensorflow" or not openvino_available():
            return device
    else:
        device = "CPU (no NVIDIA GPU found)"
    from service.runtimes.openvino import describe

    return f"{device}; {describe()}"


def lossy(variant: Variant) -> bool:
    return variant.precision != "fp32"


def eligible(variant: Variant, settings: Settings, bf16: bool) -> str | None:
    """Why `variant` may not serve under these settings on this CPU, or None when it may."""
    drop = variant.evaluation.accuracy_drop if variant.evaluation else None
    if settings.runtime not in ("auto", variant.runtime):
        return f"IMGSERVE_RUNTIME={settings.runtime}"
    if settings.precision not in ("auto", variant.precision):
        return f"IMGSERVE_PRECISION={settings.precision}"
    if variant.precision == "bf16" and not bf16:
        return "this CPU has no bfloat16 instructions"
    if lossy(variant) and (drop is None or settings.max_accuracy_drop <= 0
                           or drop * 100 > settings.max_accuracy_drop):
        measured = "not measured" if drop is None else f"{drop * 100:.2f} points"
        return f"accuracy drop {measured}, budget {settings.max_accuracy_drop:g} points (IMGSERVE_MAX_ACCURACY_DROP)"
    return None


def choose(meta: ModelMeta, settings: Settings, *, gpu: bool, bf16: bool) -> list[Variant]:
    """The variants worth trying, fastest (as measured at publish time) first; the SavedModel comes after
    them all. On a GPU, or with IMGSERVE_RUNTIME=tensorflow, the SavedModel only."""
    if gpu or settings.runtime == "tensorflow" or not openvino_available():
        return []
    picked = []
    for v in meta.variants:
        reason = eligible(v, settings, bf16)
        if reason is None:
            picked.append(v)
        else:
            logger.info("%s version %d: variant %s not used: %s", meta.name, meta.version, v.key, reason)
    return sorted(picked, key=lambda v: -(v.evaluation.images_per_s or 0.0) if v.evaluation else 0.0)


def load(path: Path, meta: ModelMeta, settings: Settings) -> Runtime:
    """The runtime serving the version in `path`: the fastest usable variant, else its SavedModel (on a CPU,
    converted by OpenVINO when that answers alike: `converted`). A variant that fails to load (or to
    answer one image) is refused with its reason, and the next one is tried."""
    gpu = nvidia_gpu_present() and tensorflow_available() and tensorflow_device(settings).startswith("GPU")
    digest: str | None = None
    for variant in choose(meta, settings, gpu=gpu, bf16=cpu_has_bf16()):
        try:
            digest = digest or savedmodel_digest(path)
            if variant.source_sha256 != digest:  # a variant answers for the SavedModel it was made from only
                raise ModelLoadError("it was made from another SavedModel than the one in this version "
                                     f"(SavedModel {digest[:24]}, variant made from {str(variant.source_sha256)[:24]})")
            from service.runtimes.openvino import OpenVINORuntime

            runtime = OpenVINORuntime(path, meta, variant, threads=settings.model_threads)
            h, w = meta.input.height, meta.input.width
            check_probabilities(runtime.predict(np.zeros((1, h, w, 3), np.uint8)), 1, meta.num_classes)
            return runtime
        except Exception as exc:
            logger.error("%s version %d: refusing variant %s, serving the next choice: %s: %s", meta.name,
                         meta.version, variant.key, exc.__class__.__name__, exc)
    if not tensorflow_available():
        tried = "none of its variants can serve here (reasons above)" if meta.variants else "it has no variant"
        raise ModelLoadError(f"{tried}, and {NO_TENSORFLOW}")
    if settings.runtime == "openvino" and meta.variants:
        logger.warning("%s version %d: IMGSERVE_RUNTIME=openvino but no variant could serve; using the "
                       "SavedModel", meta.name, meta.version)
    tensorflow_device(settings)
    from service.runtimes.tensorflow import SavedModelRuntime

    saved = SavedModelRuntime(path, meta, mixed_precision=settings.mixed_precision)
    if gpu or not settings.convert_savedmodel or settings.mixed_precision or not openvino_available() \
            or settings.runtime == "tensorflow" or settings.precision not in ("auto", "fp32"):
        return saved
    return converted(path, meta, settings, saved) or saved


CONVERSION_TOLERANCE = 1e-3  # largest probability change allowed between the SavedModel and its conversion


def converted(path: Path, meta: ModelMeta, settings: Settings, saved: Runtime) -> Runtime | None:
    """The version's SavedModel converted by OpenVINO and run in float32, when it answers a few check
    images like `saved` (TensorFlow) does; None, with the reason logged, when it does not or cannot.
    For a small model most of a batch of one is the runtime's dispatch, not arithmetic: 0.5-0.8 ms in
    TensorFlow against 0.2-0.3 ms in OpenVINO for the peers' 64x64 CNN (`python -m bench.lone`), and a
    version published without variants (by another tool, or `--variants no`) should not be the slow one."""
    from service.runtimes.openvino import OpenVINORuntime

    start = time.perf_counter()
    try:
        runtime = OpenVINORuntime.converted(path, meta, threads=settings.model_threads)
        h, w = meta.input.height, meta.input.width
        rng = np.random.default_rng(0)
        images = np.concatenate([rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8),
                                 np.zeros((1, h, w, 3), np.uint8), np.full((1, h, w, 3), 255, np.uint8)])
        ours, reference = runtime.predict(images), saved.predict(images)
        change = float(np.max(np.abs(ours - reference)))
        if not np.isfinite(change) or change > CONVERSION_TOLERANCE:
            raise ModelLoadError(f"its probabilities differ from TensorFlow's by up to {change:.2g} on the check "
                                 f"images (allowed: {CONVERSION_TOLERANCE:g})")
    except Exception as exc:
        logger.warning("%s version %d: OpenVINO's conversion of the SavedModel not used, TensorFlow serves it: "
                       "%s: %s", meta.name, meta.version, exc.__class__.__name__, exc)
        return None
    logger.info("%s version %d: its SavedModel converted by OpenVINO in %.1fs; it answers the check images "
                "within %.1g of TensorFlow (IMGSERVE_CONVERT_SAVEDMODEL=false to serve TensorFlow)", meta.name,
                meta.version, time.perf_counter() - start, change)
    return runtime


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
        together = threading.Barrier(in_flight)  # at once for sure: a thread done early would take the next

        def run_together(images: np.ndarray) -> None:
            together.wait(timeout=600)
            run(images)

        with ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(run_together, [batch(largest) for _ in range(in_flight)]))
    return time.perf_counter() - start
