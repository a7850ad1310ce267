"""The TensorFlow runtime: a published SavedModel, loaded and checked against the signature contract."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from service.cpu import cpu_has_bf16
from service.metadata import ModelMeta
from service.runtimes import ModelLoadError, check_probabilities
from service.store import read_metadata

logger = logging.getLogger(__name__)


def configure(intra_op_threads: int = 0, inter_op_threads: int = 0, mixed_precision: bool = False) -> str:
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


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


class SavedModelRuntime:
    """`serving_default`: uint8 `images` [N, H, W, 3] -> float32 `probabilities` [N, C]."""

    runtime = "tensorflow"

    def __init__(self, path: Path, meta: ModelMeta | None = None, *, mixed_precision: bool = False) -> None:
        self.path = Path(path)
        self.meta = meta or read_metadata(self.path)
        self.precision = "fp32"
        if mixed_precision and (has_gpu() or cpu_has_bf16()):
            self.precision = "fp16-mixed" if has_gpu() else "bf16-mixed"
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

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities [N, C] for uint8 RGB images [N, H, W, 3]. Blocking; releases the GIL."""
        out = self._fn(images=tf.convert_to_tensor(images, dtype=tf.uint8))["probabilities"].numpy()
        check_probabilities(out, images.shape[0], self.meta.num_classes)
        return np.asarray(out)
