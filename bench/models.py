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


def build_with_variants(store_dir: Path, images: Path, size: int = 224, count: int = 200) -> Path:
    """VGG16 with the offline pretrained convolutions (hed) and a random head, published with its OpenVINO
    variants. There is no labelled test split, so each variant is scored against the SavedModel's own
    answers on `count` real photos: its "accuracy" is its top-1 agreement with float32."""
    import keras
    import numpy as np

    from service.imaging import load_image
    from train.model import assemble, build_backbone, build_head, export_saved_model
    from train.optimize import make_variants

    keras.utils.set_random_seed(0)
    base, normalise = build_backbone("vgg16", (size, size, 3), "hed")
    head = build_head(tuple(base.output.shape[1:]), 10, 0.0)
    model = assemble(normalise, base, head, (size, size, 3))
    files = sorted(images.rglob("*.jpg"))
    step = max(1, len(files) // (2 * count))  # spread over every class folder
    x = np.stack([load_image(f, size, size) for f in files[::step][: 2 * count]])
    calibration, test = x[::2], x[1::2]
    meta = ModelMeta.create(labels=[f"class-{i}" for i in range(10)], size=(size, size), backbone="vgg16",
                            weights="hed convolutions, random head (benchmark)", name="bench-vgg16v")

    def write(tmp: Path) -> dict[str, object]:
        export_saved_model(model, tmp, size, size)
        labels = np.asarray(model.predict(test, batch_size=16, verbose=0)).argmax(axis=1)
        variants, baseline = make_variants(tmp, meta, calibration, test, labels)
        return {"variants": [v.model_dump(mode="json", exclude_none=True) for v in variants],
                "metrics": {"accuracy": baseline["accuracy"], "images_per_s": baseline["images_per_s"],
                            "test_images": len(test), "note": "labels are the SavedModel's own answers"}}

    return store.publish(store_dir, "bench-vgg16v", write, meta)
