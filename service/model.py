"""A published SavedModel, loaded and checked against the signature contract (knows nothing of queues)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from service.store import ModelMeta, read_metadata

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A version that cannot be served; the message says why."""


def configure_tensorflow(intra_op_threads: int = 0, inter_op_threads: int = 0, mixed_precision: bool = False) -> str:
    """Apply thread and precision settings (before any TensorFlow op runs) and describe the device used.

    `mixed_precision` turns on Grappler's auto mixed precision rewrite, which runs float32 graphs
    (the published SavedModels included) in float16 where it is safe; it acts on GPUs only.
    """
    try:
        if intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError as exc:  # TensorFlow already initialised (tests, reloads)
        logger.debug("thread settings not applied: %s", exc)
    gpus = tf.config.list_physical_devices("GPU")
    if mixed_precision:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision": True})
        if not gpus:
            logger.warning("IMGSERVE_MIXED_PRECISION is on but no GPU is visible: it has no effect on the CPU")
    if gpus:
        return "GPU: " + ", ".join(g.name for g in gpus) + (" (mixed precision)" if mixed_precision else "")
    return "CPU (no GPU visible to TensorFlow)"


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

    def warmup(self, batch_sizes: list[int]) -> float:
        """Run one batch of each size so no request pays for first-call costs; returns seconds spent."""
        start = time.perf_counter()
        h, w = self.input_shape
        rng = np.random.default_rng(0)
        for n in batch_sizes:
            probs = self.predict(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8))
            if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
                raise ModelLoadError(f"warm-up at batch size {n} gave probabilities that do not sum to 1")
        return time.perf_counter() - start
