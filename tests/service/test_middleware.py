"""The outermost middleware: request IDs, refusing work while draining, the body size limit, and the
in-flight limit before the body is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import LABELS, app_client, jpeg, metric_sum, write_fake_version


@pytest.fixture
def store(tmp_path: Path) -> Path:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    return tmp_path


async def test_request_ids_are_echoed_or_made(store: Path) -> None:
    async with app_client(store) as c:
        given = await c.get("/health/live", headers={"X-Request-ID": "trace-42"})
        assert given.headers["x-request-id"] == "trace-42"
        made = {(await c.get("/health/live")).headers["x-request-id"] for _ in range(3)}
        assert len(made) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in made)


async def test_while_draining_work_is_refused_and_health_still_answers(store: Path) -> None:
    async with app_client(store) as c:
        c.app.state.draining = True  # type: ignore[attr-defined]
        r = await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 503 and r.json()["code"] == "draining"
        assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        assert (await c.get("/v1/models")).status_code == 503
        assert (await c.get("/health/live")).status_code == 200
        assert (await c.get("/health/ready")).status_code == 503
        text = (await c.get("/metrics")).text
        assert metric_sum(text, "imgserve_rejections_total", reason="draining") == 2
        c.app.state.draining = False  # type: ignore[attr-defined]


async def test_a_body_over_the_limit_is_refused_by_its_length(store: Path) -> None:
    async with app_client(store, max_upload_bytes=2048) as c:
        r = await c.post("/predict", content=b"x" * 2049, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413 and "2048" in r.json()["error"]
        ok = await c.post("/predict", content=jpeg(10, size=8), headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200, ok.text
