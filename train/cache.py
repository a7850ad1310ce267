"""The on-disk feature cache: backbone outputs written once, as float16 (or bfloat16) rows, and read back
in batches, so a run's resident memory does not grow with its dataset.

Layout: one folder per run, `imgserve-features-<pid>-<random>/`, under `--cache-dir` (default: the
system temp folder). Each array is `NAME.bin` (rows, C order, no header) beside `NAME.json` (shape and
dtype) and its labels `NAME.labels.npy`. An array is written to `NAME.bin.partial` and renamed only when
complete, so a reader never sees half an array; the folder is removed when the run ends, ends with an
error or is interrupted, unless the run is asked to keep it. A folder left by a run that was killed
outright (its pid is gone) is removed by the next run that uses the same parent folder.

A kept cache is renamed `imgserve-features-kept-<key>/`, where the key hashes everything the features
depend on (dataset content, backbone, weights, cut, image size, copies, seed, dtype); a later run with
the same key reads it instead of running the backbone again, which makes trying recipes cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import keras
import ml_dtypes
import numpy as np

from service.workers import pid_alive

logger = logging.getLogger(__name__)

PREFIX = "imgserve-features-"
DTYPES: dict[str, Any] = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def remove_stale(parent: Path) -> list[Path]:
    """Remove cache folders under `parent` whose run is gone (killed before it could clean up)."""
    removed = []
    for d in parent.glob(PREFIX + "*"):
        try:
            pid = int(d.name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if d.is_dir() and pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        logger.info("removed %d feature cache folder(s) left by runs that were killed: %s", len(removed),
                    ", ".join(str(d) for d in removed))
    return removed


class ArrayWriter:
    """Appends rows of one shape to `NAME.bin.partial`; `close()` renames it to `NAME.bin` with its
    `NAME.json`. Used as a context manager, an exception removes the partial file instead."""

    def __init__(self, folder: Path, name: str, row_shape: tuple[int, ...], dtype: str) -> None:
        self.folder, self.name = folder, name
        self.path = folder / f"{name}.bin"
        self.partial = self.path.with_suffix(".bin.partial")
        self.row_shape, self.dtype = tuple(int(d) for d in row_shape), dtype
        self.rows = 0
        self._fh = self.partial.open("wb")

    def write(self, rows: np.ndarray) -> None:
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]} written to an array of rows {self.row_shape}")
        self._fh.write(np.ascontiguousarray(rows, dtype=DTYPES[self.dtype]).tobytes())
        self.rows += len(rows)

    def close(self, labels: np.ndarray | None = None) -> CachedArray:
        self._fh.close()
        if labels is not None:
            if len(labels) != self.rows:
                raise ValueError(f"{len(labels)} labels for {self.rows} rows")
            np.save(self.folder / f"{self.name}.labels.npy", np.asarray(labels, np.int64))
        meta = {"shape": [self.rows, *self.row_shape], "dtype": self.dtype}
        self.path.with_suffix(".json").write_text(json.dumps(meta))
        os.replace(self.partial, self.path)
        return CachedArray(self.path)

    def abort(self) -> None:
        self._fh.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()


class CachedArray:
    """A complete cached array, read by rows with plain file reads (no memory map, so the rows read do
    not stay in the process's resident set; the kernel's page cache keeps them warm)."""

    def __init__(self, path: Path) -> None:
        meta = json.loads(path.with_suffix(".json").read_text())
        self.path = path
        self.shape = tuple(meta["shape"])
        self.dtype = meta["dtype"]
        self._np_dtype = np.dtype(DTYPES[self.dtype])
        self._row_bytes = int(np.prod(self.shape[1:])) * self._np_dtype.itemsize
        expected = self.shape[0] * self._row_bytes
        if path.stat().st_size != expected:
            raise ValueError(f"{path} holds {path.stat().st_size} bytes, its header says {expected}")
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.shape[0])

    def labels(self) -> np.ndarray:
        return np.asarray(np.load(self.path.with_name(self.path.stem + ".labels.npy")))

    @property
    def nbytes(self) -> int:
        return int(self.shape[0] * self._row_bytes)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32."""
        n = max(0, min(stop, len(self)) - start)
        buf = os.pread(self._fd, n * self._row_bytes, start * self._row_bytes)
        return np.frombuffer(buf, self._np_dtype).reshape((n, *self.shape[1:])).astype(np.float32)

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The given rows, in the given order, as float32 (adjacent rows are read together)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        order = np.argsort(rows, kind="stable")
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and rows[order[j]] == rows[order[j - 1]] + 1:
                j += 1
            out[order[i:j]] = self.read(int(rows[order[i]]), int(rows[order[j - 1]]) + 1)
            i = j
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class FeatureCache:
    """One run's cache folder (a context manager: removed on exit unless `keep`). With a `key`, a cache
    kept by an earlier run with the same key is reused (`reused`, `open(name)`)."""

    def __init__(self, parent: Path | None, dtype: str = "float16", keep: bool = False,
                 key: dict[str, Any] | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        self.dtype, self.keep = dtype, keep
        self.arrays: dict[str, CachedArray] = {}
        digest = hashlib.sha256(json.dumps({**(key or {}), "dtype": dtype}, sort_keys=True).encode()).hexdigest()
        self.kept_as = parent / f"{PREFIX}kept-{digest[:16]}" if key is not None else None
        self.reused = self.kept_as is not None and (self.kept_as / "complete").is_file()
        if self.reused:
            assert self.kept_as is not None
            self.root = self.kept_as
            logger.info("feature cache: reusing %s (%.1f MiB, kept by an earlier run with the same data and "
                        "settings)", self.root, self.size_bytes() / 2**20)
            return
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
        logger.info("feature cache: %s (%s rows; %s when the run ends)", self.root, dtype,
                    "kept" if keep else "removed")

    def open(self, name: str) -> CachedArray:
        return self.add(name, CachedArray(self.root / f"{name}.bin"))

    def writer(self, name: str, row_shape: tuple[int, ...]) -> ArrayWriter:
        return ArrayWriter(self.root, name, row_shape, self.dtype)

    def add(self, name: str, array: CachedArray) -> CachedArray:
        self.arrays[name] = array
        logger.info("feature cache: %s %s, %.1f MiB; the cache now holds %.1f MiB in %s", name,
                    "x".join(str(d) for d in array.shape), array.nbytes / 2**20, self.size_bytes() / 2**20,
                    self.root)
        return array

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.iterdir() if f.is_file())

    def close(self, complete: bool = True) -> None:
        for a in self.arrays.values():
            a.close()
        size = self.size_bytes() if self.root.is_dir() else 0
        if self.reused:
            logger.info("feature cache left as it was: %s (%.1f MiB)", self.root, size / 2**20)
        elif self.keep and complete:
            (self.root / "complete").write_text("")
            if self.kept_as is not None:
                shutil.rmtree(self.kept_as, ignore_errors=True)
                os.replace(self.root, self.kept_as)
                self.root = self.kept_as
            logger.info("feature cache kept: %s (%.1f MiB)", self.root, size / 2**20)
        else:
            shutil.rmtree(self.root, ignore_errors=True)
            if complete:
                logger.info("feature cache removed: %s (%.1f MiB)", self.root, size / 2**20)
            else:  # the array being written was already dropped, so the size would read 0
                logger.info("feature cache removed: %s (the run stopped before the cache was complete)",
                            self.root)

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(complete=kind is None)


class CachedBatches(keras.utils.PyDataset):
    """Batches of cached rows with one-hot labels (and sample weights from class weights), reshuffled
    every epoch when `shuffle`."""

    def __init__(self, x: CachedArray, y: np.ndarray, num_classes: int, batch_size: int, *, shuffle: bool,
                 seed: int = 0, class_weight: dict[int, float] | None = None, max_batches: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} cached rows but {len(y)} labels")
        self.x, self.y, self.k, self.batch_size = x, np.asarray(y), num_classes, batch_size
        self.shuffle, self.rng = shuffle, np.random.default_rng(seed)
        self.weights = None if class_weight is None else np.array([class_weight[i] for i in range(num_classes)],
                                                                  np.float32)
        self.order = self.rng.permutation(len(x)) if shuffle else np.arange(len(x))
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = -(-len(self.x) // self.batch_size)
        return n if self.max_batches is None else max(1, min(n, self.max_batches))

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        x = self.x.take(rows) if self.shuffle else self.x.read(int(rows[0]), int(rows[-1]) + 1)
        labels = self.y[rows]
        onehot = np.eye(self.k, dtype=np.float32)[labels]
        if self.weights is None:
            return x, onehot
        return x, onehot, self.weights[labels]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.x))
