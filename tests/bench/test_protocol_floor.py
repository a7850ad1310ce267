"""bench.protocol_floor: each floor server answers the generator's real requests, and the figures it
reports come from those answers (no error, CPU time measured on the server's own threads)."""

from __future__ import annotations

import pytest

from bench.harness import DEFAULT_IMAGES
from bench.protocol_floor import SERVERS, measure


@pytest.mark.parametrize("kind", SERVERS)
def test_each_floor_server_answers_its_generator(kind: str) -> None:
    image = sorted(DEFAULT_IMAGES.rglob("*.jpg"))[0]
    row = measure(kind, image, clients=2, duration_s=1, warmup_s=1)
    assert row["errors"] == 0 and row["calls"] > 0
    assert row["calls_per_s"] > 0 and row["p50_ms"] > 0
    # the server did the work: its CPU per call is positive and its event loop's share is part of it
    # (the two are read apart, each in clock ticks: allow two ticks of 10 ms over the calls)
    tick_ms = 2 * 10 / row["calls"]
    assert 0 < row["server_loop_cpu_ms_per_call"] <= row["server_cpu_ms_per_call"] + tick_ms
