"""What the answers look like, per model version, and how far that is from its test split.

For every answered image: the predicted class (`imgserve_predicted_class_total`), the top probability
(`imgserve_top_probability`, a histogram) and whether it fell below `IMGSERVE_LOW_CONFIDENCE`
(`imgserve_low_confidence_total`). Over the last `IMGSERVE_DRIFT_WINDOW` answers of each process, the
population stability index (PSI) of the predicted-class mix and of the top-probability distribution
against the same figures on the version's own test split, which `train` writes into model.json
(`reference`): `imgserve_drift_score{signal="class_mix"|"confidence"}`. PSI under 0.1 is usually read as
no change, over 0.25 as a large one (the alert, deploy/prometheus/alerts.yml). A version published
without a reference gets the counts and no score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.metadata import CONFIDENCE_EDGES, Reference
from service.metrics import Metrics

MIN_ROWS = 100  # a window of fewer answers scores its own sampling noise
DRIFT_ALERT = 0.25  # the score deploy/prometheus/alerts.yml alerts on (a large shift, by the usual reading)
PSI_FLOOR = 1e-4  # a share of 0 on either side counts as this, so one empty bin does not make the score infinite


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (each summing to 1)."""
    e = np.maximum(np.asarray(expected, np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def confidence_bins(top: np.ndarray) -> np.ndarray:
    """The bin of each top probability: CONFIDENCE_EDGES are the bins' upper edges, the last one 1.0."""
    return np.minimum(np.searchsorted(CONFIDENCE_EDGES, top, side="left"), len(CONFIDENCE_EDGES) - 1)


def reference_from(probabilities: np.ndarray, thresholds: tuple[float, ...] = (0.5,)) -> Reference:
    """The reference `train` writes into model.json, from the served model's probabilities on the test split."""
    predicted = probabilities.argmax(axis=1)
    top = probabilities.max(axis=1).astype(np.float64)
    n = len(predicted)
    return Reference(images=n,
                     class_mix=(np.bincount(predicted, minlength=probabilities.shape[1]) / n).round(6).tolist(),
                     confidence=(np.bincount(confidence_bins(top), minlength=len(CONFIDENCE_EDGES)) / n)
                     .round(6).tolist(),
                     low_confidence={f"{t:g}": round(float((top < t).mean()), 6) for t in thresholds})


@dataclass
class Window:
    """The last `size` answers' predicted classes and confidence bins, as running counts."""

    size: int
    classes: int
    ring: np.ndarray = field(init=False)
    filled: int = 0
    head: int = 0
    class_counts: np.ndarray = field(init=False)
    bin_counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.ring = np.zeros((self.size, 2), np.int64)
        self.class_counts = np.zeros(self.classes, np.int64)
        self.bin_counts = np.zeros(len(CONFIDENCE_EDGES), np.int64)

    def add(self, predicted: np.ndarray, bins: np.ndarray) -> None:
        for c, b in zip(predicted[-self.size:].tolist(), bins[-self.size:].tolist(), strict=True):
            if self.filled == self.size:
                old_c, old_b = self.ring[self.head]
                self.class_counts[old_c] -= 1
                self.bin_counts[old_b] -= 1
            else:
                self.filled += 1
            self.ring[self.head] = (c, b)
            self.class_counts[c] += 1
            self.bin_counts[b] += 1
            self.head = (self.head + 1) % self.size

    def scores(self, reference: Reference) -> dict[str, float] | None:
        if self.filled < min(MIN_ROWS, self.size):
            return None
        n = float(self.filled)
        return {"class_mix": psi(np.asarray(reference.class_mix), self.class_counts / n),
                "confidence": psi(np.asarray(reference.confidence), self.bin_counts / n)}


class Quality:
    """One version's answer statistics in Prometheus (see the module docstring)."""

    def __init__(self, metrics: Metrics, model: str, version: int, labels: list[str], reference: Reference | None,
                 window: int, low_confidence: float) -> None:
        v = str(version)
        self.classes = [metrics.predicted_class.labels(model, v, label) for label in labels]
        self.top = metrics.top_probability.labels(model, v)
        self.low = metrics.low_confidence.labels(model, v)
        self.drift_score, self.labels = metrics.drift_score, (model, v)  # a series once there is a score
        usable = (reference is not None and len(reference.class_mix) == len(labels)
                  and tuple(reference.confidence_edges) == CONFIDENCE_EDGES)  # binned as this service bins
        self.reference = reference if usable else None
        self.window = Window(window, len(labels)) if self.reference is not None and window > 0 else None
        self.threshold = low_confidence
        # the scores are read at scrape time: computed every 50th of a window, not on every answer
        self.every, self.pending = max(1, window // 50), 0

    def observe(self, probabilities: np.ndarray) -> None:
        predicted = probabilities.argmax(axis=1)
        top = probabilities[np.arange(len(predicted)), predicted].astype(np.float64)
        for c, p in zip(predicted.tolist(), top.tolist(), strict=True):
            self.classes[c].inc()
            self.top.observe(p)
        low = int((top < self.threshold).sum())
        if low:
            self.low.inc(low)
        if self.window is not None and self.reference is not None:
            self.window.add(predicted, confidence_bins(top))
            self.pending += len(predicted)
            if self.pending < self.every:
                return
            self.pending = 0
            scores = self.window.scores(self.reference)
            if scores is not None:
                for signal, value in scores.items():
                    self.drift_score.labels(*self.labels, signal).set(value)
