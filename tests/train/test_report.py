"""The report's calibration error and confused pairs, on answers whose values are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train import report


def test_ece_of_known_answers() -> None:
    # four answers at confidence 0.9, three right: that bin is 0.9 confident and 0.75 accurate
    probs = np.array([[0.9, 0.1]] * 4 + [[0.3, 0.7]] * 4)
    y = np.array([0, 0, 0, 1] + [1, 1, 1, 1])
    cal = report.calibration(y, probs)
    # bins: 0.9 -> |0.75 - 0.9| * 4/8, 0.7 -> |1.0 - 0.7| * 4/8
    assert cal["ece"] == pytest.approx(0.5 * 0.15 + 0.5 * 0.3)
    counts = {round(b["low"], 1): b["count"] for b in cal["bins"]}
    assert counts[0.8] == 4 and counts[0.6] == 4 and sum(counts.values()) == 8
    assert cal["accuracy"] == pytest.approx(7 / 8)
    perfect = report.calibration(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert perfect["ece"] == pytest.approx(0.0)


def test_confused_pairs_are_the_largest_mistakes(tmp_path: Path) -> None:
    cm = [[5, 3, 0], [1, 6, 0], [0, 4, 2]]
    pairs = report.confused_pairs(cm, ["a", "b", "c"], count=2)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("c", "b", 4), ("a", "b", 3)]
    assert pairs[0]["share_of_true"] == pytest.approx(4 / 6)
    assert report.confused_pairs([[3, 0], [0, 2]], ["a", "b"]) == []
    images = {("c", "b"): np.zeros((2, 8, 8, 3), np.uint8)}
    report.plot_confused_pairs(pairs, images, tmp_path / "pairs.png")
    report.plot_reliability(report.calibration(np.array([0, 1]), np.array([[0.6, 0.4], [0.2, 0.8]])),
                            tmp_path / "rel.png")
    assert (tmp_path / "pairs.png").stat().st_size > 0 and (tmp_path / "rel.png").stat().st_size > 0
