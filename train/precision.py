"""Which device and precision a run trains with, and the float32 model it serves."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from service.cpu import cpu_has_bf16
from train.config import TrainConfig
from train.model import assemble, build_backbone, build_head

logger = logging.getLogger(__name__)


def device_description() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU: " + ", ".join(g.name for g in gpus)
    return "CPU (no GPU visible to TensorFlow)"


def native_bfloat16() -> bool:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return tuple(details.get("compute_capability") or (0, 0)) >= (8, 0)
    return cpu_has_bf16()


def set_precision(cfg: TrainConfig) -> str:
    """Apply --precision and say what runs it. bfloat16 is native on CPUs with AVX512_BF16 or AMX and
    on GPUs of compute capability 8.0 or newer; `auto` takes it there and float32 elsewhere."""
    native = native_bfloat16()
    if cfg.precision == "auto":
        cfg.precision = "bfloat16" if native else "float32"
    if cfg.precision == "float32":
        keras.mixed_precision.set_global_policy("float32")
        return "float32"
    if not native:
        logger.warning("--precision bfloat16 without AVX512_BF16, AMX or a recent GPU: TensorFlow emulates it, "
                       "which is slower than float32 here")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return "mixed_bfloat16" + ("" if native else " (emulated)")


def float32_copy(trained: keras.Model, cfg: TrainConfig, num_classes: int) -> keras.Model:
    """The served model in float32, with the weights trained under mixed bfloat16: the precision a
    server runs is its own choice (the OpenVINO variants, `IMGSERVE_MIXED_PRECISION`), and a bfloat16
    graph on a CPU without AVX512_BF16 would be emulated, slowly."""
    keras.mixed_precision.set_global_policy("float32")
    input_shape = (cfg.image_size, cfg.image_size, 3)
    base, normalise = build_backbone(cfg.backbone, input_shape, "none", batchnorm=cfg.batchnorm)
    head = build_head(tuple(base.output.shape[1:]), num_classes, cfg.dropout)
    served = assemble(normalise, base, head, input_shape)
    served.set_weights(trained.get_weights())
    return served
