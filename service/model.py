"""A published SavedModel, loaded and checked against the signature contract (knows nothing of queues)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from service.store import ModelMeta, read_metadata

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A version that cannot be served; the message says why."""


def cpu_has_bf16() -> bool:
    """True on x86 CPUs with bfloat16 matrix instructions (AVX512_BF16 or AMX), where oneDNN runs bf16 fast."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def configure_tensorflow(intra_op_threads: int = 0, inter_op_threads: int = 0, mixed_precision: bool = False) -> str:
    """Apply thread and precision settings (before any TensorFlow op runs) and describe the device used.

    `mixed_precision` turns on Grappler's automatic mixed precision rewrite, which runs float32 graphs
    (the published SavedModels included) in a 16-bit type where it is safe: float16 on a GPU, bfloat16
    on a CPU with AVX512_BF16 or AMX (through oneDNN). Elsewhere it has no effect and says so.
    """
    try:
        if intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError as exc:  # TensorFlow already initialised (tests, reloads)
        logger.debug("thread settings not applied: %s", exc)
    gpus = tf.config.list_physical_devices("GPU")
    precision = ""
    if mixed_precision:
        if gpus:
            tf.config.optimizer.set_experimental_options({"auto_mixed_precision": True})
            precision = " (mixed precision: float16)"
        elif cpu_has_bf16():
            tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
            precision = " (mixed precision: bfloat16)"
        else:
            logger.warning("IMGSERVE_MIXED_PRECISION is on, but there is no GPU and this CPU has no bfloat16 "
                           "instructions (AVX512_BF16, AMX): it has no effect")
    if gpus:
        return "GPU: " + ", ".join(g.name for g in gpus) + precision
    return "CPU (no GPU visible to TensorFlow)" + precision


class SavedModelClassifier:
    """`serving_default`: uint8 `images` [N, H, W, 3] -> float32 `probabilities` [N, C]."""

    def __init__(self, path: Path, meta: ModelMeta | None = None) -> None:
        self.path = Path(path)
        self.meta = meta or read_metadata(self.path)
        if not (self.path / "saved_model.pb").is_file():
            raise ModelLoadError(f"{self.path} has no saved_model.pb")
        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except Exception as exc:
            raise ModelLoadError(f"TensorFlow could not load {self.path}: {exc.__class__.__name__}: {exc}") from exc
        sig = self._loaded.signatures.get("serving_default")
        if sig is None:
            raise ModelLoadError(f"{self.path} has no serving_default signature")
        _, kwargs = sig.structured_input_signature
        spec = kwargs.get("images")
        h, w = self.meta.input.height, self.meta.input.width
        if spec is None or spec.dtype != tf.uint8 or list(spec.shape)[1:] != [h, w, 3]:
            raise ModelLoadError(
                f"serving_default must take uint8 'images' of shape [None, {h}, {w}, 3]; it takes {kwargs}"
            )
        if "probabilities" not in sig.structured_outputs:
            raise ModelLoadError(f"serving_default must return 'probabilities'; it returns "
                                 f"{list(sig.structured_outputs)}")
        self._fn = sig

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.meta.input.height, self.meta.input.width

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities [N, C] for uint8 RGB images [N, H, W, 3]. Blocking; releases the GIL."""
        out = self._fn(images=tf.convert_to_tensor(images, dtype=tf.uint8))["probabilities"].numpy()
        if out.shape != (images.shape[0], self.meta.num_classes):
            raise ModelLoadError(f"the model returned shape {out.shape}, expected "
                                 f"({images.shape[0]}, {self.meta.num_classes})")
        return out

    def predict_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        return self.predict(np.stack(rows))

    def warmup(self, batch_sizes: list[int], in_flight: int = 1) -> float:
        """Run one batch of each size so no request pays for first-call costs, then (with batches in
        flight) that many of the largest at once, so the memory for them is taken now and the resident
        size after warm-up is the one under load. Returns seconds spent."""
        start = time.perf_counter()
        h, w = self.input_shape
        rng = np.random.default_rng(0)

        def run(images: np.ndarray) -> None:
            probs = self.predict(images)
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
