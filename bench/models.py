"""Benchmark models: the real architectures with random weights, published like `train` does."""

from __future__ import annotations

from pathlib import Path

from service import store
from service.metadata import ModelMeta


def build(store_dir: Path, kind: str, backbone: str, size: int) -> Path:
    import keras

    from train.model import assemble, build_backbone, build_head, export_saved_model

    keras.utils.set_random_seed(0)
    base, normalise = build_backbone(backbone, (size, size, 3), "none")
    head = build_head(tuple(base.output.shape[1:]), 10, 0.0)
    model = assemble(normalise, base, head, (size, size, 3))
    meta = ModelMeta.create(labels=[f"class-{i}" for i in range(10)], size=(size, size), backbone=backbone,
                            weights="random (benchmark)")
    return store.publish(store_dir, f"bench-{kind}", lambda tmp: export_saved_model(model, tmp, size, size), meta)
