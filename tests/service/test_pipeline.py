"""The request path every protocol shares (service/pipeline.py): deadlines, counts, pixel arrays, top-k."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import pytest

from service.errors import BadRequest, PayloadTooLarge
from service.pipeline import b64_image, check_count, deadline_for, pixel_rows, top_k
from service.settings import Settings


def test_the_deadline_is_the_setting_or_the_header_within_the_cap() -> None:
    s = Settings(request_timeout_ms=3000, max_request_timeout_ms=10_000)
    before = time.monotonic()
    plain = deadline_for(None, s)
    own = deadline_for("10000", s)
    after = time.monotonic()
    assert before + 3.0 <= plain <= after + 3.0 and before + 10.0 <= own <= after + 10.0
    for bad in ("10001", "0", "-5", "1.5", "soon", ""):
        with pytest.raises(BadRequest, match="(?i)x-request-timeout-ms"):
            deadline_for(bad, s)


def test_image_counts() -> None:
    s = Settings(max_images_per_request=4)
    check_count(1, s)
    check_count(4, s)
    with pytest.raises(BadRequest, match="no image"):
        check_count(0, s)
    with pytest.raises(PayloadTooLarge, match="the limit is 4"):
        check_count(5, s)


def test_base64_images() -> None:
    assert b64_image(base64.b64encode(b"\xff\xd8abc").decode(), "x") == b"\xff\xd8abc"
    for bad in ("not base64!", 12, None, "YWJj=extra"):
        with pytest.raises(BadRequest):
            b64_image(bad, "instances[0]")


@pytest.mark.parametrize(("values", "shape", "error"), [
    (np.zeros((1, 4, 4, 3)).tolist(), None, None),
    (np.zeros(48).tolist(), [1, 4, 4, 3], None),
    (np.zeros((1, 4, 5, 3)).tolist(), None, "shape"),
    (np.zeros(47).tolist(), [1, 4, 4, 3], "do not form"),
    ([[[[0, 0, 0]] * 4] * 3 + [[[0, 0]] * 4]], None, "ragged|do not form"),
    ((np.zeros((1, 4, 4, 3)) + 256).tolist(), None, "between 0 and 255"),
    ((np.zeros((1, 4, 4, 3)) + 0.5).tolist(), None, "integers"),
    ([[[["a", "b", "c"]] * 4] * 4], None, "integers"),
])
def test_pixel_arrays_are_checked(values: Any, shape: list[int] | None, error: str | None) -> None:
    if error is None:
        rows = pixel_rows(values, 4, 4, shape)
        assert len(rows) == 1 and rows[0].dtype == np.uint8 and rows[0].shape == (4, 4, 3)
    else:
        with pytest.raises(BadRequest, match=error):
            pixel_rows(values, 4, 4, shape)


def test_top_k_is_best_first_with_ties_in_class_order() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]], np.float32)
    out = top_k(probs, ["a", "b", "c"], 2)
    assert [[t["label"] for t in row] for row in out] == [["b", "c"], ["a", "c"]]
    assert out[0][0] == {"label": "b", "index": 1, "score": pytest.approx(0.6)}
    assert len(top_k(probs, ["a", "b", "c"], 10)[0]) == 3  # k past the classes: every class
