"""The OpenVINO runtime: an IR variant of a version (float32, bfloat16 or int8), or its SavedModel converted
at load (float32), on the CPU."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov

from service.metadata import ModelMeta, Variant
from service.runtimes import ModelLoadError, check_probabilities

logger = logging.getLogger(__name__)

# The precision OpenVINO computes in; int8 IRs carry their own quantized ops, the rest stays float32.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def describe() -> str:
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return f"OpenVINO {ov.get_version().split('-')[0]} on CPU ({', '.join(caps)})"


class OpenVINORuntime:
    """uint8 `images` [N, H, W, 3] -> float32 `probabilities` [N, C], one infer request per thread."""

    runtime = "openvino"

    def __init__(self, version_dir: Path, meta: ModelMeta, variant: Variant, threads: int = 0) -> None:
        if variant.precision not in INFERENCE_PRECISION:
            raise ModelLoadError(f"variant {variant.key}: unknown precision {variant.precision!r}")
        xml = Path(version_dir) / variant.path
        if not xml.is_file() or not xml.with_suffix(".bin").is_file():
            raise ModelLoadError(f"variant {variant.key}: {xml} or its .bin is missing")
        try:
            model = ov.Core().read_model(xml)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the parser's message
            raise ModelLoadError(f"variant {variant.key}: OpenVINO could not load {xml}: {exc}") from exc
        self._setup(model, meta, variant.precision, threads, f"variant {variant.key}")

    @classmethod
    def converted(cls, version_dir: Path, meta: ModelMeta, threads: int = 0) -> OpenVINORuntime:
        """The version's SavedModel itself, converted now by OpenVINO's TensorFlow front end (no TensorFlow
        import; under a second for VGG16), run in float32."""
        try:
            model = ov.convert_model(str(version_dir))
        except Exception as exc:
            raise ModelLoadError(f"OpenVINO could not convert the SavedModel in {version_dir}: {exc}") from exc
        runtime = cls.__new__(cls)
        runtime._setup(model, meta, "fp32", threads, "the converted SavedModel")
        return runtime

    def _setup(self, model: ov.Model, meta: ModelMeta, precision: str, threads: int, what: str) -> None:
        self.meta = meta
        self.precision = precision
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY",
                                     "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        h, w = meta.input.height, meta.input.width
        self._compiled = _compile(model, config, what)
        inp = self._compiled.inputs[0]
        shape = inp.get_partial_shape()
        if inp.get_element_type() != ov.Type.u8 or shape.rank.get_length() != 4 or [
                d.get_length() for d in list(shape)[1:]] != [h, w, 3]:
            raise ModelLoadError(f"{what}: input must be u8 [?, {h}, {w}, 3], it is {inp.get_element_type()} {shape}")
        self.threads = threads
        single = _single_call_s(self._compiled, h, w) if not threads else None
        if single is not None and single < ONE_THREAD_BELOW_S:
            logger.info("%s: a batch of one takes %.2f ms: run on one thread", what, single * 1e3)
            self.threads = 1
            self._compiled = _compile(model, {**config, "INFERENCE_NUM_THREADS": 1}, what)
        self._local = threading.local()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Blocking; OpenVINO releases the GIL while it infers."""
        held = getattr(self._local, "request", None)
        if held is None:
            held = self._local.request = _Request(self._compiled.create_infer_request(), self._compiled)
        request = held.request
        request.infer({0: np.ascontiguousarray(images, dtype=np.uint8)})
        out = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        check_probabilities(out, images.shape[0], self.meta.num_classes)
        return out


# A batch of one shorter than this runs on one thread when the runtime may choose (one process owning
# the cores): a second thread does not shorten so short a call (0.62 ms either way at batch 4 for the
# peers' 64x64 CNN), and OpenVINO's idle threads spin for a while after each call, which cost the
# event loop most of a core between calls (1.95 cores busy against 1.00, 2026-12-04).
ONE_THREAD_BELOW_S = 0.002


def _compile(model: ov.Model, config: dict[str, object], what: str) -> ov.CompiledModel:
    try:
        return ov.Core().compile_model(model, "CPU", config)
    except Exception as exc:
        raise ModelLoadError(f"{what}: OpenVINO could not compile it: {exc}") from exc


def _single_call_s(compiled: ov.CompiledModel, height: int, width: int) -> float:
    """The shortest of five warm batches of one (the least disturbed by the machine's other work)."""
    request = compiled.create_infer_request()
    images = np.zeros((1, height, width, 3), np.uint8)
    times = []
    for i in range(8):
        start = time.perf_counter()
        request.infer({0: images})
        if i >= 3:
            times.append(time.perf_counter() - start)
    return min(times)


class _Request:
    """A thread's infer request with a reference to its compiled model, so that the model is never freed
    before the request. A request made on a thread that outlives the runtime (the event loop, which runs
    lone rows inline) is freed only with the runtime's thread-local storage, and freeing it after its
    compiled model corrupted the heap."""

    __slots__ = ("request", "compiled")

    def __init__(self, request: ov.InferRequest, compiled: ov.CompiledModel) -> None:
        self.request = request
        self.compiled = compiled
