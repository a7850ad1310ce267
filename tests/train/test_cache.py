"""The on-disk feature cache: same features as in memory, nothing half-written left behind, bounded
batches for Keras. The time budget is in test_budget.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from train import cache as fcache
from train.config import TrainConfig
from train.features import cache_split
from train.model import ToFloat, augmentation, build_backbone, split_linear
from train.splits import find_splits, load_data

ROOT = Path(__file__).resolve().parents[2]


def test_rows_round_trip_and_take_in_any_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 30, (37, 3, 3, 4)).astype(np.float32)
    with fcache.FeatureCache(tmp_path, "float16") as c:
        w = c.writer("a", (3, 3, 4))
        w.write(x[:20])
        w.write(x[20:])
        assert not (c.root / "a.bin").exists() and (c.root / "a.bin.partial").exists()
        arr = c.add("a", w.close())
        assert arr.shape == (37, 3, 3, 4) and not (c.root / "a.bin.partial").exists()
        np.testing.assert_allclose(arr.read(0, 37), x, rtol=1e-3, atol=1e-2)
        rows = [36, 2, 3, 4, 0, 17, 16]
        np.testing.assert_allclose(arr.take(rows), x[rows], rtol=1e-3, atol=1e-2)
        assert arr.read(35, 99).shape[0] == 2
        root = c.root
    assert not root.exists()  # removed when the run ends


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    with fcache.FeatureCache(tmp_path) as c:
        def interrupted() -> None:
            with c.writer("a", (2,)) as w:
                w.write(np.ones((3, 2), np.float32))
                raise RuntimeError("interrupted")

        with pytest.raises(RuntimeError):
            interrupted()
        assert list(c.root.iterdir()) == []  # the partial array is gone
        def wrong_shape() -> None:
            with c.writer("b", (2,)) as w:
                w.write(np.ones((3, 5), np.float32))

        with pytest.raises(ValueError, match="rows of shape"):
            wrong_shape()
        assert list(c.root.iterdir()) == []


def test_a_kept_cache_is_reused_by_key_and_an_unfinished_one_never(tmp_path: Path) -> None:
    key = {"data": "abc", "size": 32}
    def interrupted() -> None:
        with fcache.FeatureCache(tmp_path, keep=True, key=key) as c:
            c.writer("a", (2,)).close(np.zeros(0))
            raise RuntimeError("interrupted before the cache was complete")

    with pytest.raises(RuntimeError):
        interrupted()
    assert list(tmp_path.iterdir()) == []  # asked to keep it, but it was not finished: removed
    with fcache.FeatureCache(tmp_path, keep=True, key=key) as c:
        assert not c.reused
        w = c.writer("a", (2,))
        w.write(np.arange(6, dtype=np.float32).reshape(3, 2))
        c.add("a", w.close(np.array([2, 0, 1])))
    kept = [d.name for d in tmp_path.iterdir()]
    assert len(kept) == 1 and kept[0].startswith(fcache.PREFIX + "kept-")
    with fcache.FeatureCache(tmp_path, keep=True, key=key) as c:
        assert c.reused
        arr = c.open("a")
        np.testing.assert_array_equal(arr.read(0, 3), np.arange(6).reshape(3, 2))
        np.testing.assert_array_equal(arr.labels(), [2, 0, 1])
    with fcache.FeatureCache(tmp_path, keep=True, key={**key, "size": 64}) as c:
        assert not c.reused  # another image size: other features


def test_a_killed_runs_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{fcache.PREFIX}{dead.pid}-abc"
    stale.mkdir()
    (stale / "train.bin.partial").write_bytes(b"x" * 100)
    alive = tmp_path / f"{fcache.PREFIX}{os.getppid()}-def"  # a live process's folder is left alone
    alive.mkdir()
    with fcache.FeatureCache(tmp_path):
        assert not stale.exists() and alive.exists()


def test_bfloat16_rows(tmp_path: Path) -> None:
    x = np.linspace(-300, 300, 60, dtype=np.float32).reshape(10, 6)
    with fcache.FeatureCache(tmp_path, "bfloat16") as c:
        w = c.writer("a", (6,))
        w.write(x)
        arr = w.close()
        assert arr.path.stat().st_size == 10 * 6 * 2
        np.testing.assert_allclose(arr.read(0, 10), x, rtol=1e-2)


def test_disk_cache_gives_the_in_memory_features(tmp_path: Path, clothing: Path) -> None:
    """The pipeline's streamed, chunked, float16 features equal the prefix run on all images in memory."""
    cfg = TrainConfig(data=clothing, store=tmp_path, backbone="vgg16", weights="none", image_size=32,
                      max_per_class=4, batch_size=5, workers=2, augment_copies=0)
    base, normalise = build_backbone("vgg16", (32, 32, 3), "none")
    prefix, _ = split_linear(base, "block5_conv1")
    images = keras.Input((32, 32, 3), dtype="uint8")
    fx = keras.Model(images, prefix(normalise(images)), name="features")
    in_memory = load_data(cfg, find_splits(cfg)[0])
    expected = np.asarray(fx(in_memory.x_tr))
    streamed = load_data(cfg, find_splits(cfg)[0], decode=False)
    with fcache.FeatureCache(tmp_path / "cache", "float16") as c:
        arr, labels = cache_split(c, "train", streamed, "train", [fx], cfg, len(streamed.source.train))
        got = arr.read(0, len(arr))
    assert got.shape == expected.shape
    np.testing.assert_array_equal(labels, in_memory.y_tr)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * scale)
    # an augmenting model writes different rows (so the copies are not the originals again)
    aug = keras.Model(images, prefix(normalise(augmentation(1)(ToFloat()(images)))), name="f_1_augmented")
    with fcache.FeatureCache(tmp_path / "cache", "float16") as c:
        both, labels2 = cache_split(c, "train", streamed, "train", [fx, aug], cfg, len(streamed.source.train))
        assert len(both) == 2 * len(expected) and len(labels2) == len(both)
        assert not np.allclose(both.read(0, len(both))[5:10], got[:5], atol=1e-3 * scale)


def test_batches_shuffle_and_weigh(tmp_path: Path) -> None:
    with fcache.FeatureCache(tmp_path) as c:
        w = c.writer("a", (1,))
        w.write(np.arange(10, dtype=np.float32).reshape(10, 1))
        arr = w.close()
        y = np.array([0, 1] * 5)
        b = fcache.CachedBatches(arr, y, 2, 4, shuffle=True, seed=3, class_weight={0: 1.0, 1: 3.0})
        assert len(b) == 3
        seen = np.concatenate([b[i][0][:, 0] for i in range(len(b))])
        assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
        x, onehot, weights = b[0]
        np.testing.assert_array_equal(onehot.argmax(axis=1), x[:, 0].astype(int) % 2)
        np.testing.assert_array_equal(weights, np.where(x[:, 0].astype(int) % 2, 3.0, 1.0))
        assert len(fcache.CachedBatches(arr, y, 2, 4, shuffle=False, max_batches=1)) == 1


def _store_is_empty(store: Path) -> bool:
    return not store.exists() or all(not any(d.iterdir()) for d in store.iterdir() if d.is_dir())


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "when"), [(signal.SIGTERM, "features"), (signal.SIGINT, "phase head")])
def test_an_interrupted_run_leaves_no_cache_and_no_version(tmp_path: Path, clothing: Path, sig: int,
                                                           when: str) -> None:
    """Interrupted while a cached array is half-written (SIGTERM), or while training (Ctrl-C)."""
    cache_dir, store = tmp_path / "cache", tmp_path / "store"
    # enough photos that the features take a while to catch one half-written; few when training is the target
    per_class = "60" if when == "features" else "12"
    cmd = [sys.executable, "-m", "train", "--data", str(clothing), "--store", str(store), "--name", "vgg",
           "--weights", "none", "--image-size", "64", "--max-per-class", per_class, "--batch-size", "4",
           "--head-epochs", "200", "--patience", "200", "--cache-dir", str(cache_dir), "--variants", "no",
           "--workers", "1", "--precision", "float32", "--augment-copies", "0"]
    log = tmp_path / "train.log"

    def reached() -> bool:
        if when == "features":  # a partial array is being written right now
            return bool(list(cache_dir.glob("*/*.partial")))
        return when in log.read_text()

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not reached() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert reached(), log.read_text()[-3000:]
            proc.send_signal(sig)
            code = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert code != 0, text[-2000:]
    assert "feature cache removed" in text and "nothing was published" in text
    assert "stopped before the cache was complete" in text and "(0.0 MiB)" not in text
    assert list(cache_dir.iterdir()) == []  # no folder, no half-written array
    assert _store_is_empty(store), list(store.rglob("*"))  # no version, no hidden temporary folder
