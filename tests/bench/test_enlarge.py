"""bench.enlarge: the larger copy keeps the layout, holds factor times the images, all decodable."""

from __future__ import annotations

from pathlib import Path

from bench.enlarge import enlarge
from service.imaging import load_image
from train.data import discover


def test_a_three_times_copy_keeps_layout_and_decodes(tmp_path: Path) -> None:
    from train.synthetic import make_dataset

    src = make_dataset(tmp_path / "src", per_class=4)
    before = discover(src, seed=1)
    n = enlarge(src, tmp_path / "big", factor=3, seed=1)
    after = discover(tmp_path / "big", seed=1)
    assert after.classes == before.classes
    total_before = len(before.train) + len(before.validation) + len(before.test)
    assert n == 3 * total_before == len(after.train) + len(after.validation) + len(after.test)
    files = sorted((tmp_path / "big").rglob("*.jpg"))
    assert len({f.read_bytes() for f in files}) == len(files)  # duplicates differ from their original
    for f in files[:6]:
        assert load_image(f, 32, 32).shape == (32, 32, 3)
