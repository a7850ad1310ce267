"""Command line: `python -m train --data DIR ...`, `python -m train demo`, `... optimize` and `... publish`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # the time budget counts from here: importing TensorFlow is part of the run

DEMO_NAME = "demo-shapes"


def _parser() -> argparse.ArgumentParser:
    from train.config import add_arguments

    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune an image classifier on a folder-per-class dataset and publish it as a new "
        "version in the model store. `python -m train demo` trains a small demo model on synthetic shapes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    return p


def store_location(text: str) -> Path | str:
    from train.config import store_location as location

    return location(text)


def _demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train demo",
                                description="Train a small CNN on synthetic shapes (no download, ~1-3 minutes).")
    p.add_argument("--store", type=store_location, default=store_location(os.environ.get("IMGSERVE_MODEL_STORE",
                                                                                       "model_store")),
                   help="a folder, or object storage (s3://bucket/prefix)")
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30, help="epochs at most")
    p.add_argument("--time-budget-min", type=float, default=1.25,
                   help="training stops so the demo ends in about this much more time (0: no budget)")
    p.add_argument("--if-missing", action="store_true", help="do nothing when the demo model already exists")
    args = p.parse_args(argv)
    if args.if_missing and _has_demo(args.store):
        print(f"{DEMO_NAME} already in {args.store}; nothing to do")
        return 0
    from train.pipeline import TrainConfig, run
    from train.synthetic import make_dataset

    with tempfile.TemporaryDirectory(prefix="imgserve-demo-") as tmp:
        root = make_dataset(Path(tmp) / "shapes", per_class=args.per_class)
        result = run(TrainConfig(
            data=root, store=args.store, name=DEMO_NAME, backbone="cnn", weights="none",
            image_size=args.image_size, head_epochs=args.epochs, patience=6, batch_size=32,
            time_budget_min=args.time_budget_min, precision="float32", ema_momentum=0.0,
            extra_metadata={"demo": True, "description": "Demo model trained on synthetic shapes"},
        ), started=STARTED)
    print(f"published {result.published} (test accuracy {result.metrics['accuracy']:.3f})")
    return 0


def _has_demo(location: Path | str) -> bool:
    """A complete version of the demo model is in the store (a folder, or object storage)."""
    from train.publish import complete_versions

    return bool(complete_versions(location, DEMO_NAME))


def _publish(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train publish",
                                description="Copy a published version into a store (a folder, or object storage) "
                                "as the next version of a model: to seed a bucket, or to move a model from a "
                                "staging store to production. model.json is written last. Needs no TensorFlow.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", type=Path,
                   help="a version folder (<store>/<model>/<version>), or a model folder: its newest version")
    p.add_argument("--store", type=store_location, required=True, help="a folder, or s3://bucket/prefix")
    p.add_argument("--name", help="the model's name there (default: the source's)")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when the model already has a complete version there")
    args = p.parse_args(argv)
    from service.remote import RemoteError
    from service.store import StoreError
    from train.publish import complete_versions, copy_version, resolve_source

    try:
        source = resolve_source(args.source)
        name = args.name or json.loads((source / "model.json").read_text())["name"]
        if args.if_missing and complete_versions(args.store, name):
            print(f"{name} already in {args.store}; nothing to do")
            return 0
        print(f"published {copy_version(source, args.store, name)}")
    except (ValueError, OSError, KeyError, StoreError, RemoteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _optimize(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train optimize",
                                description="Publish a new version of a model: a copy of a published version with "
                                "OpenVINO variants (float32/bfloat16 IR, NNCF int8 IR) evaluated on its test split.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", type=Path, default=Path(os.environ.get("IMGSERVE_MODEL_STORE", "model_store")))
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--version", type=int, help="version to optimize (default: the latest)")
    p.add_argument("--data", type=Path, help="the dataset it was trained on (default: the path in its model.json)")
    p.add_argument("--calibration-images", type=int, default=300, help="training images that calibrate int8")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")
    args = p.parse_args(argv)
    from train.data import DatasetError
    from train.optimize import optimize_published

    try:
        final = optimize_published(args.store, args.name, args.version, args.data, args.calibration_images,
                                   args.workers)
    except (DatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"published {final}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])
    if argv[:1] == ["optimize"]:
        return _optimize(argv[1:])
    if argv[:1] == ["publish"]:
        return _publish(argv[1:])
    args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C at the run's next safe point, so the feature cache and an unfinished
    # version are removed
    from train import stopping

    stopping.install()
    from train.config import from_arguments
    from train.data import DatasetError
    from train.model import WeightsUnavailable
    from train.pipeline import resolve_data, run

    try:
        cfg = from_arguments(args)
        cfg.data = resolve_data(str(args.data))
        result = run(cfg, started=STARTED)
    except (DatasetError, WeightsUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was published, and the feature cache was removed", file=sys.stderr)
        return 130
    m = result.metrics
    print(f"published {result.published}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
