"""service/quality.py: the population stability index, the window of recent answers, the reference `train`
writes, and the metrics one version's answers move."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.metadata import CONFIDENCE_EDGES, ModelMeta, Reference
from service.metrics import Metrics
from service.quality import DRIFT_ALERT, MIN_ROWS, Quality, Window, confidence_bins, psi, reference_from


def test_psi_is_zero_for_the_same_mix_and_large_for_one_class_out_of_ten() -> None:
    uniform = np.full(10, 0.1)
    assert psi(uniform, uniform) == pytest.approx(0.0)
    one = np.eye(10)[3]
    assert psi(uniform, one) > 10 * DRIFT_ALERT
    # a mild shift (a tenth of one class's share moved to another) stays well below the alert
    mild = uniform.copy()
    mild[0], mild[1] = 0.09, 0.11
    assert 0 < psi(uniform, mild) < DRIFT_ALERT / 10


def test_confidence_bins_follow_the_upper_edges() -> None:
    top = np.array([0.1, 0.2, 0.2001, 0.5, 0.949, 0.95, 0.999, 1.0])
    assert confidence_bins(top).tolist() == [0, 0, 1, 3, 8, 8, 9, 9]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, len(CONFIDENCE_EDGES) - 1)), min_size=1, max_size=80),
       st.integers(1, 30), st.integers(1, 7))
def test_the_window_counts_exactly_the_last_answers(rows: list[tuple[int, int]], size: int, chunk: int) -> None:
    """However the answers arrive (batches of any size), the window's counts are those of the last `size`."""
    w = Window(size, 5)
    for i in range(0, len(rows), chunk):
        part = np.asarray(rows[i:i + chunk])
        w.add(part[:, 0], part[:, 1])
    last = rows[-size:]
    assert w.filled == len(last)
    assert w.class_counts.tolist() == np.bincount([c for c, _ in last], minlength=5).tolist()
    assert w.bin_counts.tolist() == np.bincount([b for _, b in last], minlength=len(CONFIDENCE_EDGES)).tolist()


def test_the_reference_is_the_test_splits_answers() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    ref = reference_from(probs)
    assert ref.images == 4 and ref.class_mix == [0.5, 0.5]
    assert ref.confidence == [0, 0, 0, 0, 0.5, 0, 0.25, 0.25, 0, 0]  # 0.55 and 0.6 in (0.5, 0.6]; 0.8; 0.9
    assert ref.low_confidence == {"0.5": 0.0}
    assert sum(ref.confidence) == pytest.approx(1.0)


def test_model_json_refuses_a_reference_for_other_labels() -> None:
    ref = reference_from(np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]))
    with pytest.raises(ValueError, match="3 shares for 2 labels"):
        ModelMeta.create(labels=["a", "b"], size=(8, 8), backbone="cnn", reference=ref)
    with pytest.raises(ValueError, match="one share per bin"):
        Reference(images=1, class_mix=[1.0, 0.0], confidence=[1.0])


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_versions_answers_move_its_counts_and_its_drift_score() -> None:
    metrics = Metrics()
    rng = np.random.default_rng(0)
    test_split = np.eye(4)[rng.integers(0, 4, 400)] * 0.7 + 0.075  # top probability 0.775, classes even
    q = Quality(metrics, "m", 3, ["a", "b", "c", "d"], reference_from(test_split), window=200, low_confidence=0.5)
    labels = {"model": "m", "version": "3"}
    q.observe(test_split[:MIN_ROWS - 1])
    assert _value(metrics, "imgserve_drift_score", **labels, signal="class_mix") is None  # too few answers yet
    q.observe(test_split[MIN_ROWS - 1:300])
    assert _value(metrics, "imgserve_drift_score", **labels, signal="class_mix") < DRIFT_ALERT / 5  # type: ignore[operator]
    assert _value(metrics, "imgserve_top_probability_count", **labels) == 300
    total = sum(_value(metrics, "imgserve_predicted_class_total", **labels, label=c) or 0 for c in "abcd")
    assert total == 300
    assert (_value(metrics, "imgserve_low_confidence_total", **labels) or 0) == 0
    # then every answer is class "b" with a low top probability: both scores cross the alert within a window
    shifted = np.tile([0.2, 0.4, 0.2, 0.2], (200, 1))
    q.observe(shifted)
    assert _value(metrics, "imgserve_drift_score", **labels, signal="class_mix") > DRIFT_ALERT  # type: ignore[operator]
    assert _value(metrics, "imgserve_drift_score", **labels, signal="confidence") > DRIFT_ALERT  # type: ignore[operator]
    assert _value(metrics, "imgserve_low_confidence_total", **labels) == 200
    assert _value(metrics, "imgserve_predicted_class_total", **labels, label="b") >= 200  # type: ignore[operator]


def test_a_version_without_a_reference_is_counted_but_not_scored() -> None:
    metrics = Metrics()
    q = Quality(metrics, "m", 1, ["a", "b"], None, window=100, low_confidence=0.5)
    q.observe(np.tile([0.3, 0.7], (150, 1)))
    assert _value(metrics, "imgserve_predicted_class_total", model="m", version="1", label="b") == 150
    assert _value(metrics, "imgserve_drift_score", model="m", version="1", signal="class_mix") is None
