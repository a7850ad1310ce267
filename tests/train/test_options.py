"""The `python -m train` options the README promises, on small real runs: a weights file, `--fine-tune-from`,
`--cache-features no`, `--class-weights no`, `--variants no`, undecodable files counted in the report,
`--keep-cache yes` reused by a second run, and `demo --if-missing`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support import REPO, write_fake_version
from train.pipeline import TrainConfig, run


def small_dataset(clothing: Path, root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """A flat folder of a few clothing classes, and one file in it that is not an image."""
    for folder in sorted(p for p in (clothing / "train").iterdir() if p.is_dir())[:classes]:
        (root / folder.name).mkdir(parents=True)
        for f in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copy(f, root / folder.name / f.name)
    (root / folder.name / "notes.jpg").write_text("not an image")
    return root


def layer(model: Any, name: str) -> Any:
    """A layer found by name anywhere inside nested Keras models."""
    for lyr in model.layers:
        if lyr.name == name:
            return lyr
        if hasattr(lyr, "layers"):
            found = layer(lyr, name)
            if found is not None:
                return found
    return None


@pytest.mark.slow
def test_a_weights_file_fine_tuned_from_a_layer_end_to_end(tmp_path: Path, clothing: Path) -> None:
    import keras

    data = small_dataset(clothing, tmp_path / "data")
    start = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights = tmp_path / "start.weights.h5"
    start.save_weights(weights)
    result = run(TrainConfig(data=data, store=tmp_path / "store", name="opts", backbone="vgg16", weights=str(weights),
                             image_size=32, head_epochs=1, fine_tune_epochs=1, fine_tune_from="block4_conv1",
                             cache_features=False, class_weights=False, variants=False, batch_size=4, workers=2,
                             time_budget_min=0, ema_momentum=0.9))
    # the backbone started from the file's weights (the layers before block4_conv1 were never trained)
    assert np.array_equal(layer(result.model, "block1_conv1").get_weights()[0],
                          start.get_layer("block1_conv1").get_weights()[0])
    run_info = json.loads((result.version_dir / "report" / "metrics.json").read_text())["run"]
    assert run_info["fine_tune_from"] == "block4_conv1" and run_info["epochs"].get("fine_tune", 0) >= 1, run_info
    assert run_info["ema_momentum"] == 0.9  # both phases kept a moving average (tests/train/test_fitting.py)
    meta = json.loads((result.version_dir / "model.json").read_text())
    assert meta["variants"] == [] and not (result.version_dir / "variants").exists()  # --variants no
    assert meta["training"]["cache_features"] is False and meta["training"]["class_weights"] is False
    assert meta["dataset"]["skipped_files"] == 1
    report = json.loads((result.version_dir / "report" / "metrics.json").read_text())
    assert [Path(p).name for p in report["skipped_files"]] == ["notes.jpg"]
    assert "Skipped files (could not be decoded): 1." in (result.version_dir / "report" / "report.md").read_text()


@pytest.mark.slow
def test_a_kept_feature_cache_is_reused_by_the_next_run(tmp_path: Path, clothing: Path) -> None:
    data = small_dataset(clothing, tmp_path / "data")
    cfg = dict(data=data, store=tmp_path / "store", name="kept", backbone="vgg16", weights="none", image_size=32,
               head_epochs=1, fine_tune_epochs=0, cache_features=True, keep_cache=True, cache_dir=tmp_path / "cache",
               variants=False, batch_size=4, workers=2, augment_copies=0)
    first = json.loads((run(TrainConfig(**cfg)).version_dir / "report" / "metrics.json").read_text())["run"]["cache"]
    assert first["reused"] is False and Path(first["folder"]).is_dir()  # kept after the run
    second = json.loads((run(TrainConfig(**cfg)).version_dir / "report" / "metrics.json").read_text())["run"]["cache"]
    assert second["reused"] is True and second["folder"] == first["folder"]
    other = json.loads((run(TrainConfig(**{**cfg, "image_size": 40})).version_dir / "report" / "metrics.json")
                       .read_text())["run"]["cache"]
    assert other["reused"] is False  # other backbone settings: another cache


def test_demo_if_missing_leaves_a_store_with_the_demo_model_alone(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "demo-shapes", 1, ["circle", "square", "triangle"])
    r = subprocess.run([sys.executable, "-m", "train", "demo", "--store", str(tmp_path), "--if-missing"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already in" in r.stdout and "nothing to do" in r.stdout
    assert sorted(p.name for p in (tmp_path / "demo-shapes").iterdir() if not p.name.startswith(".")) == ["1"]
