"""Evaluation (train/evaluation.py): the served model's answers on the test split, in the split's order,
and the metrics computed from exactly those answers."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from train.config import TrainConfig
from train.evaluation import evaluate
from train.splits import find_splits, load_data, sample
from train.synthetic import make_dataset


def tiny_model(k: int) -> keras.Model:
    x = keras.Input((16, 16, 3), dtype="uint8")
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(x))
    return keras.Model(x, keras.layers.Dense(k, activation="softmax")(h))


def test_the_metrics_are_those_of_the_answers_returned(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", per_class=30, size=16)
    cfg = TrainConfig(data=tmp_path / "d", store=tmp_path / "s", image_size=16, workers=2, batch_size=4)
    full, _ = find_splits(cfg)
    model = tiny_model(len(full.classes))
    streamed = evaluate(model, load_data(cfg, full, decode=False), cfg)
    decoded = evaluate(model, load_data(cfg, full), cfg)
    assert streamed.paths == full.test.paths == decoded.paths
    np.testing.assert_array_equal(streamed.y, full.test.labels)
    np.testing.assert_allclose(streamed.probs, decoded.probs, rtol=1e-5)
    m = streamed.metrics
    assert m["test_images"] == len(full.test)
    assert m["accuracy"] == float(np.mean(streamed.probs.argmax(1) == streamed.y))
    assert "test_sample_of" not in m


def test_a_sampled_test_split_says_so(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", per_class=30, size=16)
    cfg = TrainConfig(data=tmp_path / "d", store=tmp_path / "s", image_size=16, workers=2)
    full, _ = find_splits(cfg)
    ds = sample(full, len(full.train), len(full.validation), 8, cfg.seed)
    ev = evaluate(tiny_model(len(full.classes)), load_data(cfg, ds, full, decode=False), cfg)
    assert ev.metrics["test_images"] == len(ds.test) == 8 and ev.metrics["test_sample_of"] == len(full.test)
