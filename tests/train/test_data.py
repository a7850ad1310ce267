"""Dataset discovery, splitting, corrupt files and the command line's errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import REPO
from train.data import DatasetError, discover, load_split, stratified_split
from train.synthetic import make_dataset


def test_flat_folder_gets_a_seeded_stratified_split(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", per_class=20, size=16)
    a = discover(tmp_path / "d", seed=1)
    b = discover(tmp_path / "d", seed=1)
    c = discover(tmp_path / "d", seed=2)
    assert a.classes == ["circle", "cross", "square", "triangle"]
    assert (len(a.train), len(a.validation), len(a.test)) == (56, 12, 12)
    for split in (a.train, a.validation, a.test):
        assert sorted(set(split.labels)) == [0, 1, 2, 3]  # every class in every split
    assert a.train.paths == b.train.paths and a.train.paths != c.train.paths
    assert not set(a.train.paths) & set(a.test.paths)
    assert not a.presplit


def test_presplit_folders_are_used(clothing: Path) -> None:
    ds = discover(clothing)
    assert ds.presplit and len(ds.classes) == 10
    assert all(p.parts[-3] == "validation" for p in ds.validation.paths)
    # no test/ folder: the test split is carved out of train, never from validation
    assert all(p.parts[-3] == "train" for p in ds.test.paths)
    assert not set(ds.train.paths) & set(ds.test.paths)


def test_val_alias_and_unknown_class(tmp_path: Path) -> None:
    make_dataset(tmp_path / "train", per_class=4, size=16)
    make_dataset(tmp_path / "val", per_class=2, size=16)
    make_dataset(tmp_path / "test", per_class=2, size=16)
    ds = discover(tmp_path)
    assert len(ds.validation) == 8 and len(ds.test) == 8
    (tmp_path / "test" / "hexagon").mkdir()
    (tmp_path / "test" / "hexagon" / "x.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="hexagon"):
        discover(tmp_path)


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path) -> None:
    make_dataset(tmp_path, per_class=5, size=16)
    (tmp_path / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "circle" / "notes.txt").write_text("not an image")
    ds = discover(tmp_path)
    assert any(s.endswith("notes.txt") for s in ds.skipped)
    skipped: list[str] = []
    split = ds.train
    split.paths.append(tmp_path / "circle" / "broken.jpg")
    split.labels.append(0)
    x, y, paths = load_split(split, 16, 16, skipped)
    assert skipped == [str(tmp_path / "circle" / "broken.jpg")]
    assert len(x) == len(y) == len(paths) == len(split) - 1
    assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3)


def test_stratified_split_fractions() -> None:
    per_class = {"a": [Path(f"a{i}") for i in range(100)], "b": [Path(f"b{i}") for i in range(10)]}
    _, tr, va, te = stratified_split(per_class, (0.7, 0.15, 0.15), 0)
    assert (len(tr), len(va), len(te)) == (70 + 6, 15 + 2, 15 + 2)
    assert va.labels.count(1) >= 1 and te.labels.count(1) >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/does/not/exist"], "does not exist"),
        (["--data", "{flat}", "--backbone", "alexnet"], "invalid choice"),
        (["--data", "{flat}", "--backbone", "resnet50", "--weights", "hed"], "VGG16 weights only"),
        (["--data", "{flat}", "--weights", "/no/such.weights.h5"], "does not exist"),
        (["--data", "{flat}", "--name", "Bad Name"], "invalid model name"),
        (["--data", "{one}"], "at least two"),
        (["--data", "flowers"], "offline"),
    ],
)
def test_cli_errors_are_clear(tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process (`main`, as `python -m train` calls it; the next test runs one for real)."""
    from train import stopping
    from train.__main__ import main

    monkeypatch.setattr(stopping, "install", lambda: None)  # the test process keeps its own signal handlers
    make_dataset(tmp_path / "flat", per_class=4, size=16)
    (tmp_path / "one" / "only").mkdir(parents=True)
    args = [a.format(flat=tmp_path / "flat", one=tmp_path / "one") for a in args]
    try:
        code = main([*args, "--store", str(tmp_path / "store")])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err[-2000:]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("model.json"))


def test_the_cli_exits_2_with_the_reason_on_stderr(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(tmp_path / "missing"), "--store",
                        str(tmp_path / "store")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "store").exists()


def test_help_explains_every_option() -> None:
    r = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for opt in ("--backbone", "--weights", "--fine-tune-from", "--image-size", "hed", "flowers"):
        assert opt in r.stdout
