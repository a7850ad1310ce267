"""The run's splits: found and limited (`find_splits`), sampled to the plan (`sample`), then decoded up
front or a chunk at a time as the strategy needs (`load_data`, `Data`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train import data as dataset
from train import stopping
from train.config import TrainConfig

logger = logging.getLogger(__name__)


def limit_per_class(split: dataset.Split, per_class: int | None, seed: int) -> dataset.Split:
    """At most `per_class` images of each class (a seeded pick, in the split's order)."""
    if per_class is None:
        return split
    order = np.random.default_rng(seed).permutation(len(split))
    seen: dict[int, int] = {}
    keep = []
    for i in order:
        y = split.labels[i]
        if seen.get(y, 0) < per_class:
            seen[y] = seen.get(y, 0) + 1
            keep.append(int(i))
    keep.sort()
    return dataset.Split([split.paths[i] for i in keep], [split.labels[i] for i in keep])


def stratified_sample(split: dataset.Split, count: int, seed: int) -> dataset.Split:
    """About `count` images with the split's class proportions (each class keeps at least one), seeded."""
    if count >= len(split):
        return split
    labels = np.asarray(split.labels)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for y in np.unique(labels):
        rows = np.flatnonzero(labels == y)
        take = max(1, round(count * len(rows) / len(split)))
        keep.extend(rng.permutation(rows)[:take].tolist())
    keep.sort()
    return dataset.Split([split.paths[i] for i in keep], [split.labels[i] for i in keep])


def find_splits(cfg: TrainConfig) -> tuple[dataset.Dataset, dataset.Extra | None]:
    """Discover and split the dataset, limit it per class, add the extra training photos."""
    ds = dataset.discover(cfg.data, seed=cfg.seed)
    ds = dataclasses.replace(ds, train=limit_per_class(ds.train, cfg.max_per_class, cfg.seed),
                             validation=limit_per_class(ds.validation, cfg.max_per_class, cfg.seed),
                             test=limit_per_class(ds.test, cfg.max_per_class, cfg.seed))
    if len(ds.validation) == 0 or len(ds.test) == 0:
        raise dataset.DatasetError("the dataset is too small: validation and test splits need images")
    extra = dataset.add_extra(ds, cfg.extra_data) if cfg.extra_data is not None else None
    if extra is not None:
        logger.info("extra data %s: %d photos added to the training split %s; %d left out (also in the validation "
                    "or test split)", extra.root, len(extra.split), extra.per_class, extra.held_out)
    return ds, extra


def sample(ds: dataset.Dataset, train: int, validation: int, test: int, seed: int,
           extra: dataset.Extra | None = None) -> dataset.Dataset:
    """The dataset with its splits cut to the plan's sizes (stratified, seeded); the extra photos (feedback)
    are all kept in the training split."""
    if train < len(ds.train) and extra is not None and len(extra.split):
        added = set(extra.split.paths)
        mine = [i for i, path in enumerate(ds.train.paths) if path not in added]
        own = dataset.Split([ds.train.paths[i] for i in mine], [ds.train.labels[i] for i in mine])
        picked = stratified_sample(own, max(1, train - len(added)), seed)
        ds = dataclasses.replace(ds, train=dataset.Split(picked.paths + extra.split.paths,
                                                         picked.labels + extra.split.labels))
        train = len(ds.train)
    return dataclasses.replace(ds, train=stratified_sample(ds.train, train, seed),
                               validation=stratified_sample(ds.validation, validation, seed + 1),
                               test=stratified_sample(ds.test, test, seed + 2))


@dataclass
class Data:
    """The run's splits; the pixel arrays are decoded up front only for the strategies that train on
    images (the cached-features strategy streams them a chunk at a time, and leaves them None). `full`
    is the dataset before the plan's samples: its content hash identifies the data."""

    classes: list[str]
    source: dataset.Dataset
    size: int
    workers: int
    full: dataset.Dataset
    x_tr: np.ndarray | None = None
    y_tr: np.ndarray | None = None
    x_va: np.ndarray | None = None
    y_va: np.ndarray | None = None
    x_te: np.ndarray | None = None
    y_te: np.ndarray | None = None
    test_paths: list[Path] = field(default_factory=list)
    extra: dataset.Extra | None = None  # --extra-data: photos added to the training split

    @functools.cached_property
    def content_hash(self) -> str:
        return self.full.content_hash()

    def chunks(self, split: str, chunk: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, list[Path]]]:
        """(pixels, labels, paths) a chunk at a time: from the decoded arrays, or decoded on the fly.
        A stop signal is acted on between chunks."""
        for part in self._chunks(split, chunk):
            stopping.check()
            yield part

    def _chunks(self, split: str, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[Path]]]:
        x = getattr(self, f"x_{split[:2]}")
        if x is not None:
            y = getattr(self, f"y_{split[:2]}")
            paths = self.test_paths if split == "test" else [Path()] * len(x)
            for i in range(0, len(x), chunk):
                yield x[i : i + chunk], y[i : i + chunk], paths[i : i + chunk]
            return
        yield from dataset.iter_split(getattr(self.source, split), self.size, self.size, self.source.skipped,
                                      self.workers, chunk)

    def images(self, split: str, count: int, seed: int) -> np.ndarray:
        """A seeded sample of `count` decoded images of a split (for calibration and speed measurements)."""
        x = getattr(self, f"x_{split[:2]}")
        if x is not None:
            pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:count])
            return np.asarray(x[pick])
        picked = dataset.subset(getattr(self.source, split), count, seed)
        return dataset.load_split(picked, self.size, self.size, [], self.workers)[0]

    def test_images(self, paths: list[Path], rows: np.ndarray | None = None) -> Any:
        """The test images at `paths` (or those at `rows` of them): the decoded array, or a sequence that
        decodes a slice at a time."""
        if self.x_te is not None:
            return self.x_te if rows is None else self.x_te[rows]
        chosen = paths if rows is None else [paths[int(i)] for i in rows]
        return dataset.LazyImages(chosen, self.size, self.size, self.workers)


def load_data(cfg: TrainConfig, ds: dataset.Dataset, full: dataset.Dataset | None = None,
              extra: dataset.Extra | None = None, decode: bool = True) -> Data:
    """The splits of `ds`; with `decode`, every image decoded with the service's own decoder."""
    data = Data(ds.classes, ds, cfg.image_size, cfg.workers, full or ds, extra=extra)
    if not decode:
        logger.info("classes %s; images train %d, validation %d, test %d (decoded as they are used)",
                    ds.classes, len(ds.train), len(ds.validation), len(ds.test))
        return data
    size = cfg.image_size
    data.x_tr, data.y_tr, _ = dataset.load_split(ds.train, size, size, ds.skipped, cfg.workers)
    data.x_va, data.y_va, _ = dataset.load_split(ds.validation, size, size, ds.skipped, cfg.workers)
    data.x_te, data.y_te, data.test_paths = dataset.load_split(ds.test, size, size, ds.skipped, cfg.workers)
    logger.info("classes %s; images train %d, validation %d, test %d; skipped %d undecodable",
                ds.classes, len(data.x_tr), len(data.x_va), len(data.x_te), len(ds.skipped))
    if len(data.x_tr) == 0 or len(data.x_va) == 0 or len(data.x_te) == 0:
        raise dataset.DatasetError("after skipping undecodable files a split is empty")
    return data
