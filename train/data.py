"""Finding, splitting and loading a folder-per-class image dataset."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.imaging import ImageError, load_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


class DatasetError(Exception):
    """The dataset folder cannot be used; the message says why."""


@dataclass
class Split:
    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    train: Split
    validation: Split
    test: Split
    presplit: bool
    skipped: list[str] = field(default_factory=list)

    def class_counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name in ("train", "validation", "test"):
            counts = Counter(getattr(self, name).labels)
            out[name] = {c: counts.get(i, 0) for i, c in enumerate(self.classes)}
        return out

    def content_hash(self) -> str:
        """SHA-256 over every file's relative path and bytes, in a stable order."""
        h = hashlib.sha256()
        for split in (self.train, self.validation, self.test):
            for p in sorted(split.paths):
                h.update(str(p.relative_to(self.root) if p.is_relative_to(self.root) else p).encode())
                h.update(p.read_bytes())
        return h.hexdigest()


@dataclass
class Extra:
    """Photos added to the training split from another folder (`--extra-data`: the service's feedback)."""

    root: Path
    split: Split
    per_class: dict[str, int]
    held_out: int  # photos left out because the same bytes are in the validation or test split


def add_extra(ds: Dataset, folder: Path) -> Extra:
    """Add `folder`'s photos (a sub-folder per class, each a class of `ds`) to the training split only. A photo
    whose bytes are also in the validation or test split is left out: those splits stay comparable with the
    earlier versions' and never see a photo trained on."""
    if not folder.is_dir():
        raise DatasetError(f"extra data folder {folder} does not exist")
    per_class = {c: [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
                 for c, files in _class_files(folder).items()}
    unknown = sorted(set(per_class) - set(ds.classes))
    if unknown:
        raise DatasetError(f"{folder} has classes the dataset has not: {unknown} (the dataset's: {ds.classes}); add "
                           "photos of them to the dataset first")
    held = {hashlib.sha256(p.read_bytes()).digest() for p in [*ds.validation.paths, *ds.test.paths]}
    split, counts, left_out = Split([], []), {}, 0
    for c, files in per_class.items():
        keep = [f for f in files if hashlib.sha256(f.read_bytes()).digest() not in held]
        left_out += len(files) - len(keep)
        split.paths.extend(keep)
        split.labels.extend([ds.classes.index(c)] * len(keep))
        counts[c] = len(keep)
    ds.train.paths.extend(split.paths)
    ds.train.labels.extend(split.labels)
    return Extra(folder, split, counts, left_out)


def _class_files(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
        classes[d.name] = files
    return classes


def _find_split_dirs(root: Path) -> dict[str, Path] | None:
    found = {}
    for split, names in SPLIT_NAMES.items():
        for n in names:
            if (root / n).is_dir():
                found[split] = root / n
                break
    if "train" in found and ("validation" in found or "test" in found):
        return found
    return None


def stratified_split(
    per_class: dict[str, list[Path]], fractions: tuple[float, float, float], seed: int
) -> tuple[list[str], Split, Split, Split]:
    """Split each class by the given train/validation/test fractions, seeded; every split gets
    at least one file of each class that has three or more."""
    classes = sorted(per_class)
    rng = random.Random(seed)
    out = [Split([], []), Split([], []), Split([], [])]
    for idx, c in enumerate(classes):
        files = list(per_class[c])
        rng.shuffle(files)
        n = len(files)
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
        parts = (files[n_val + n_test :], files[:n_val], files[n_val : n_val + n_test])
        for split, part in zip(out, parts, strict=True):
            split.paths.extend(part)
            split.labels.extend([idx] * len(part))
    return classes, out[0], out[1], out[2]


def discover(
    root: Path, *, seed: int = 1337, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
) -> Dataset:
    """Read the layout of `root`: pre-split (`train/`, `validation/` or `val/`, `test/`) or one folder per class."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    splits = _find_split_dirs(root)
    if splits:
        per_split = {k: _class_files(v) for k, v in splits.items()}
        classes = sorted(per_split["train"])
        if len(classes) < 2:
            raise DatasetError(f"{splits['train']} must hold at least two class folders, found {classes}")
        # A missing validation or test split is carved out of train, seeded.
        if "validation" not in per_split or "test" not in per_split:
            _, tr, va, te = stratified_split(per_split["train"], (0.85, 0.15, 0.0) if "test" in per_split
                                             else (0.85, 0.0, 0.15), seed)
            given = {"train": tr, "validation": va, "test": te}
        else:
            given = {"train": _to_split(per_split["train"], classes)}
        for name in ("validation", "test"):
            if name in per_split:
                extra = set(per_split[name]) - set(classes)
                if extra:
                    raise DatasetError(f"{splits[name]} has classes not in train: {sorted(extra)}")
                given[name] = _to_split(per_split[name], classes)
        ds = Dataset(root, classes, given["train"], given["validation"], given["test"], presplit=True)
    else:
        per_class = _class_files(root)
        if len(per_class) < 2:
            raise DatasetError(
                f"{root} must hold one sub-folder per class (at least two), or train/ and validation/ "
                f"or test/ sub-folders; found {sorted(per_class)}"
            )
        classes, tr, va, te = stratified_split(per_class, fractions, seed)
        ds = Dataset(root, classes, tr, va, te, presplit=False)
    for name in ("train", "validation", "test"):
        split = getattr(ds, name)
        keep = [(p, y) for p, y in zip(split.paths, split.labels, strict=True) if p.suffix.lower() in IMAGE_SUFFIXES]
        ds.skipped.extend(str(p) for p in split.paths if p.suffix.lower() not in IMAGE_SUFFIXES)
        split.paths, split.labels = [p for p, _ in keep], [y for _, y in keep]
    if len(ds.train) == 0:
        raise DatasetError(f"no images found under {root}")
    return ds


def _to_split(per_class: dict[str, list[Path]], classes: list[str]) -> Split:
    split = Split([], [])
    for c, files in per_class.items():
        split.paths.extend(files)
        split.labels.extend([classes.index(c)] * len(files))
    return split


def load_split(
    split: Split, height: int, width: int, skipped: list[str], workers: int = 4
) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Decode every image of a split with the serving decoder; undecodable files are skipped and recorded."""

    def one(p: Path) -> np.ndarray | None:
        try:
            return load_image(p, height, width)
        except (ImageError, OSError) as exc:
            logger.warning("skipping %s: %s", p, exc)
            return None

    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(one, split.paths))
    images, labels, paths = [], [], []
    for arr, y, p in zip(arrays, split.labels, split.paths, strict=True):
        if arr is None:
            skipped.append(str(p))
            continue
        images.append(arr)
        labels.append(y)
        paths.append(p)
    x = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return x, np.asarray(labels, dtype=np.int64), paths


def iter_split(
    split: Split, height: int, width: int, skipped: list[str], workers: int = 4, chunk: int = 256
) -> Iterator[tuple[np.ndarray, np.ndarray, list[Path]]]:
    """`load_split` a chunk of images at a time, so only one chunk of pixels is in memory."""
    for i in range(0, len(split), chunk):
        part = Split(split.paths[i : i + chunk], split.labels[i : i + chunk])
        x, y, paths = load_split(part, height, width, skipped, workers)
        if len(x):
            yield x, y, paths


def subset(split: Split, count: int, seed: int) -> Split:
    """A seeded sample of at most `count` images of a split, in the split's order."""
    pick = sorted(np.random.default_rng(seed).permutation(len(split))[:count].tolist())
    return Split([split.paths[i] for i in pick], [split.labels[i] for i in pick])


class LazyImages:
    """A split's images as a sliceable sequence, decoded a slice at a time (nothing kept)."""

    def __init__(self, paths: list[Path], height: int, width: int, workers: int = 4) -> None:
        self.paths, self.height, self.width, self.workers = paths, height, width, workers

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, part: slice) -> np.ndarray:
        sub = self.paths[part]
        return load_split(Split(sub, [0] * len(sub)), self.height, self.width, [], self.workers)[0]
