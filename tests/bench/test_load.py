"""The benchmark's steady-state rate: bursts of answers (one per batch) must not bias it."""

from __future__ import annotations

import pytest

from bench.load import steady_rate


def bursts(period: float, size: int, first: float, until: float, spread: float = 0.004) -> list[float]:
    out, t = [], first
    while t < until:
        out += [t + i * spread / size for i in range(size)]
        t += period
    return out


@pytest.mark.parametrize("first", [0.1, 1.3, 2.45])
def test_bursts_give_the_true_rate_wherever_the_window_cuts(first: float) -> None:
    # 16 answers every 2.5 s = 6.4/s; the window [0, 29] cuts the bursts at different places
    times = bursts(2.5, 16, first, 40.0)
    answered, span = steady_rate(times, 0.0, 29.0)
    assert answered / span == pytest.approx(6.4, rel=0.01)


def test_a_steady_stream_is_counted_over_the_window() -> None:
    times = [i * 0.002 for i in range(10_000)]  # 500/s, no bursts
    answered, span = steady_rate(times, 2.0, 12.0)
    assert answered / span == pytest.approx(500, rel=0.01)
