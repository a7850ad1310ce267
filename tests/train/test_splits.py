"""The run's splits (train/splits.py): limited per class, sampled to the plan with the class mix kept and
the feedback photos all kept, and decoded up front or a chunk at a time alike."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from train.config import TrainConfig
from train.data import Split, add_extra, discover
from train.splits import find_splits, limit_per_class, load_data, sample, stratified_sample
from train.synthetic import make_dataset


def split_of(counts: dict[int, int]) -> Split:
    paths, labels = [], []
    for y, n in counts.items():
        paths += [Path(f"c{y}/{i}.jpg") for i in range(n)]
        labels += [y] * n
    return Split(paths, labels)


def test_a_stratified_sample_keeps_the_class_mix_and_is_seeded() -> None:
    split = split_of({0: 600, 1: 300, 2: 90, 3: 10})
    got = stratified_sample(split, 100, seed=1)
    assert Counter(got.labels) == {0: 60, 1: 30, 2: 9, 3: 1}
    assert got.paths == stratified_sample(split, 100, seed=1).paths != stratified_sample(split, 100, seed=2).paths
    assert set(got.paths) <= set(split.paths) and len(set(got.paths)) == 100
    assert got.paths == sorted(got.paths, key=split.paths.index)  # in the split's order
    assert stratified_sample(split, 5000, seed=1) is split  # asked for more than there is: all of it


def test_a_rare_class_keeps_one_image() -> None:
    got = stratified_sample(split_of({0: 995, 1: 5}), 20, seed=3)
    assert Counter(got.labels)[1] == 1


def test_limit_per_class() -> None:
    got = limit_per_class(split_of({0: 50, 1: 3}), 10, seed=0)
    assert Counter(got.labels) == {0: 10, 1: 3}


def test_sampling_keeps_every_feedback_photo(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", per_class=40, size=16)
    make_dataset(tmp_path / "fb", per_class=3, size=16, seed=9)
    ds = discover(tmp_path / "d", seed=1)
    extra = add_extra(ds, tmp_path / "fb")
    assert len(extra.split) == 12
    cut = sample(ds, train=30, validation=len(ds.validation), test=10, seed=1, extra=extra)
    assert set(extra.split.paths) <= set(cut.train.paths)
    assert 28 <= len(cut.train) <= 32 and len(cut.test) <= 12
    assert cut.validation.paths == ds.validation.paths
    assert len(ds.train) > len(cut.train)  # the dataset itself is left as it was


def test_decoded_up_front_or_a_chunk_at_a_time_alike(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", per_class=20, size=16)
    cfg = TrainConfig(data=tmp_path / "d", store=tmp_path / "s", image_size=16, workers=2)
    full, extra = find_splits(cfg)
    ds = sample(full, 30, len(full.validation), len(full.test), cfg.seed)
    decoded = load_data(cfg, ds, full, extra)
    streamed = load_data(cfg, ds, full, extra, decode=False)
    assert decoded.x_tr is not None and len(decoded.x_tr) == len(ds.train) < len(full.train)
    parts = list(streamed.chunks("train", chunk=7))
    np.testing.assert_array_equal(np.concatenate([x for x, _, _ in parts]), decoded.x_tr)
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in parts]), decoded.y_tr)
    # the content hash is the whole dataset's, whatever was sampled
    assert decoded.content_hash == full.content_hash() == load_data(cfg, full).content_hash
