"""The backbone table: what training needs to know about each architecture, as plain data (no Keras
import), so that the command line lists the choices without loading TensorFlow. train/model.py builds
from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    """One row: everything training needs to know about an architecture."""

    application: str | None  # the keras.applications constructor's name; None: the plain CNN
    normalise: str  # uint8 RGB -> what the network was trained on: "caffe" (BGR minus the ImageNet mean) or "unit"
    unfreeze_from: str | None  # first layer of the block fine-tuned in phase 2
    chain: bool  # a plain chain of layers: a CPU can cache the frozen prefix's outputs
    hed_weights: bool = False  # --weights hed applies


BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone("VGG16", "caffe", "block5_conv1", chain=True, hed_weights=True),
    "resnet50": Backbone("ResNet50", "caffe", "conv5_block1_1_conv", chain=False),
    "cnn": Backbone(None, "unit", None, chain=True),
}

BACKBONE_NAMES = tuple(BACKBONES)
