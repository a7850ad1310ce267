"""The app through its ASGI lifespan, with a fake classifier: routes, errors, headers, metrics."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.support import (
    LABELS,
    FakeClassifier,
    app_client,
    eventually,
    eventually_async,
    jpeg,
    metric_sum,
    wait_ready,
    write_fake_version,
)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    settings = Settings(model_store=tmp_path, max_batch_delay_ms=20, poll_interval_s=0.05,
                        max_upload_bytes=200_000, max_images_per_request=4, max_image_pixels=1_000_000,
                        inline_run_max_ms=0)  # batching is what these tests look at; inline has its own test
    app = create_app(settings, loader=lambda path, meta: FakeClassifier(meta))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            await wait_ready(c)
            yield c


async def test_predict_multipart_answers_each_image_in_order(client: httpx.AsyncClient) -> None:
    files = [("file", ("a.jpg", jpeg(250), "image/jpeg")), ("file", ("b.jpg", jpeg(10), "image/jpeg"))]
    r = await client.post("/predict?top_k=2", files=files, headers={"X-Request-ID": "abc-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake" and body["version"] == 1
    assert [p["filename"] for p in body["predictions"]] == ["a.jpg", "b.jpg"]
    assert [p["top"][0]["label"] for p in body["predictions"]] == ["bright", "dark"]
    assert len(body["predictions"][0]["top"]) == 2
    assert body["predictions"][0]["top"][0]["score"] == pytest.approx(0.9)
    assert r.headers["x-model-name"] == "fake" and r.headers["x-model-version"] == "1"
    assert r.headers["x-request-id"] == "abc-1"
    assert "queue;dur=" in r.headers["server-timing"] and 'batch;desc="2"' in r.headers["server-timing"]


async def test_raw_image_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", content=jpeg(128), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top"][0]["label"] == "mid"
    assert len(r.headers["x-request-id"]) == 32  # made when not given


async def test_concurrent_requests_share_batches(client: httpx.AsyncClient) -> None:
    rs = await asyncio.gather(*(client.post("/predict", content=jpeg(v), headers={"Content-Type": "image/jpeg"})
                                for v in (10, 128, 250, 10, 250)))
    assert [r.json()["predictions"][0]["top"][0]["label"] for r in rs] == ["dark", "mid", "bright", "dark", "bright"]
    metrics = (await client.get("/metrics")).text
    count = metric_sum(metrics, "imgserve_batch_size_count", model="fake", version="1")
    total = metric_sum(metrics, "imgserve_batch_size_sum", model="fake", version="1")
    assert total >= 5 and count < total  # at least one batch held more than one row


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "bad_request"),
        ({"content": b"not an image at all", "headers": {"Content-Type": "image/jpeg"}}, 415,
         "unsupported_media_type"),
        ({"content": b"x" * 300_000, "headers": {"Content-Type": "image/jpeg"}}, 413, "payload_too_large"),
        ({"files": [("other", ("a.jpg", b"x", "image/jpeg"))]}, 400, "bad_request"),
        ({"files": [("file", ("a.jpg", b"", "image/jpeg"))]}, 400, "bad_request"),
    ],
)
async def test_bad_input_is_a_clear_4xx(client: httpx.AsyncClient, kwargs: dict[str, object], status: int,
                                        code: str) -> None:
    r = await client.post("/predict", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["error"]


async def test_too_many_images_names_the_limit(client: httpx.AsyncClient) -> None:
    files = [("file", (f"{i}.jpg", jpeg(10), "image/jpeg")) for i in range(5)]
    r = await client.post("/predict", files=files)
    assert r.status_code == 413
    assert "limit is 4" in r.json()["error"]


async def test_decompression_bomb_refused_before_decoding(client: httpx.AsyncClient) -> None:
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, "PNG")  # 4 Mpx > the 1 Mpx limit; a few KB on the wire
    r = await client.post("/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413
    assert "pixels" in r.json()["error"]


@pytest.mark.parametrize(
    ("query", "status"),
    [("top_k=0", 422), ("top_k=-1", 422), ("top_k=1000000000", 422), ("model=nope", 404),
     ("version=2", 404), ("version=0", 422), ("version=abc", 422), ("model=../x", 404)],
)
async def test_bad_parameters(client: httpx.AsyncClient, query: str, status: int) -> None:
    r = await client.post(f"/predict?{query}", content=jpeg(1), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == status, r.text
    assert "error" in r.json()


async def test_bad_timeout_header(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", content=jpeg(1),
                          headers={"Content-Type": "image/jpeg", "X-Request-Timeout-Ms": "soon"})
    assert r.status_code == 400 and "X-Request-Timeout-Ms".lower() in r.json()["error"].lower()


async def test_models_listing_and_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).json() == {"status": "live"}
    ready = await client.get("/health/ready")
    assert ready.json()["models"] == {"fake": 1}
    models = (await client.get("/v1/models")).json()["models"]
    assert models[0]["name"] == "fake" and models[0]["labels"] == LABELS
    assert models[0]["versions"] == [{"version": 1, "state": "AVAILABLE", "role": "stable", "runtime": "fake",
                                      "precision": "fp32", "gate": "not compared with an earlier version (no "
                                      "comparison in its model.json): promoted as published"}]


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_broken_version_is_refused_and_old_keeps_serving(client: httpx.AsyncClient, tmp_path: Path) -> None:
    bad = tmp_path / "fake" / "2"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    async def states() -> dict[int, str]:
        models = (await client.get("/v1/models")).json()["models"]
        return {v["version"]: v["state"] for v in models[0]["versions"]}

    seen = await eventually_async(states, lambda got: got.get(2) == "FAILED")
    assert seen == {1: "AVAILABLE", 2: "FAILED"}
    r = await client.post("/predict", content=jpeg(250), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert 'imgserve_model_loads_total{model="fake",outcome="failure"} 1.0' in (await client.get("/metrics")).text


async def test_new_version_is_swapped_in(client: httpx.AsyncClient, tmp_path: Path) -> None:
    write_fake_version(tmp_path, "fake", 2, LABELS)

    async def predict() -> httpx.Response:
        r = await client.post("/predict", content=jpeg(250), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200  # every request is answered, by version 1 until the swap
        return r

    r = await eventually_async(predict, lambda r: r.json()["version"] == 2)
    assert r.headers["x-model-version"] == "2"


async def test_not_ready_without_models(tmp_path: Path) -> None:
    app = create_app(Settings(model_store=tmp_path / "empty"), loader=lambda p, m: FakeClassifier(m))
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c:
            r = await c.get("/health/ready")
            assert r.status_code == 503 and r.json()["code"] == "not_ready"
            r = await c.post("/predict", content=jpeg(1), headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 503


async def test_warmup_failure_is_refused(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    async with app_client(tmp_path, loader=lambda p, m: FakeClassifier(m, fail_warmup=True), ready=False) as c:
        async def models() -> list[dict[str, Any]]:
            return (await c.get("/v1/models")).json()["models"]  # type: ignore[no-any-return]

        got = await eventually_async(models, lambda m: bool(m) and m[0]["versions"][0]["state"] == "FAILED")
        assert "warm-up exploded" in got[0]["versions"][0]["reason"]
        assert (await c.get("/health/ready")).status_code == 503


async def test_models_allowlist(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    write_fake_version(tmp_path, "other", 1, LABELS)
    app = create_app(Settings(model_store=tmp_path, models="other"), loader=lambda p, m: FakeClassifier(m))
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c:
            await wait_ready(c)
            assert (await c.get("/health/ready")).json()["models"] == {"other": 1}
            r = await c.post("/predict?model=fake", content=jpeg(1), headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 404


async def test_model_json_batching_block_overrides_the_settings(tmp_path: Path) -> None:
    """A model's own `batching` block wins over the service-wide settings, for that model only."""
    write_fake_version(tmp_path, "small", 1, LABELS, batching={"max_batch_size": 2, "max_batch_delay_ms": 200})
    write_fake_version(tmp_path, "other", 1, LABELS)
    fakes: dict[str, FakeClassifier] = {}

    def loader(path: Path, meta: object) -> FakeClassifier:
        fakes[meta.name] = FakeClassifier(meta)  # type: ignore[attr-defined]
        return fakes[meta.name]  # type: ignore[attr-defined]

    settings = Settings(model_store=tmp_path, max_batch_size=16, max_batch_delay_ms=200, poll_interval_s=0.05,
                        inline_run_max_ms=0)
    app = create_app(settings, loader=loader)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c:
            async def ready() -> dict[str, Any]:
                return (await c.get("/health/ready")).json()  # type: ignore[no-any-return]

            await eventually_async(ready, lambda r: r.get("models", {}).keys() == {"small", "other"})
            for name in ("small", "other"):
                fakes[name].batches.clear()  # drop warm-up
                rs = await asyncio.gather(*(c.post(f"/predict?model={name}", content=jpeg(v),
                                                   headers={"Content-Type": "image/jpeg"}) for v in range(6)))
                assert all(r.status_code == 200 for r in rs)
            assert max(fakes["small"].batches) == 2 and sum(fakes["small"].batches) == 6
            assert max(fakes["other"].batches) > 2  # the service-wide 16 applies to the model without a block
            warm = [1, 2]  # warm-up follows the model's own largest batch
            assert list(app.state.registry.served["small"].batching.warmup_sizes) == warm


async def test_over_the_inflight_limit_is_refused_before_the_body_is_read(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    settings = Settings(model_store=tmp_path, poll_interval_s=0.05, max_inflight_requests=2)
    release = asyncio.Event()
    body_reads = 0

    app = create_app(settings, loader=lambda path, meta: FakeClassifier(meta))
    async with LifespanManager(app) as manager:
        async def slow_body(content: bytes) -> AsyncIterator[bytes]:
            nonlocal body_reads
            body_reads += 1
            await release.wait()
            yield content

        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            await wait_ready(c)
            held = [asyncio.create_task(c.post("/predict", content=slow_body(jpeg(200)),
                                               headers={"Content-Type": "image/jpeg"})) for _ in range(2)]
            await eventually(lambda: body_reads >= 2, what="two bodies being read")
            refused = await c.post("/predict", content=slow_body(jpeg(200)), headers={"Content-Type": "image/jpeg"})
            assert refused.status_code == 429
            assert refused.json()["code"] == "queue_full" and refused.headers["retry-after"] == "1"
            assert body_reads == 2  # the third body was never read
            assert (await c.get("/health/ready")).status_code == 200  # GETs are not limited
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})).status_code == 200
            text = (await c.get("/metrics")).text
    assert metric_sum(text, "imgserve_rejections_total", reason="busy") == 1
    assert metric_sum(text, "imgserve_http_requests_total", handler="/predict", status="429") == 1
    assert metric_sum(text, "imgserve_http_requests_total", handler="/predict", status="200") == 3
    assert metric_sum(text, "imgserve_inflight_requests") == 0


async def test_a_bad_image_among_several_is_named_by_its_place(client: httpx.AsyncClient) -> None:
    files = [("file", ("a.jpg", jpeg(10), "image/jpeg")), ("file", ("b.pdf", b"%PDF-1.4 nope", "image/jpeg"))]
    r = await client.post("/predict", files=files)
    assert r.status_code == 415, r.text
    assert r.json()["error"].startswith("image 2 of 2: ")


@pytest.mark.parametrize("inline_ms", [2.0, 0.0])
async def test_a_lone_request_runs_inline_on_an_idle_cheap_model(tmp_path: Path, inline_ms: float) -> None:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    settings = Settings(model_store=tmp_path, max_batch_delay_ms=20, poll_interval_s=0.05,
                        inline_run_max_ms=inline_ms)
    app = create_app(settings, loader=lambda path, meta: FakeClassifier(meta))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            await wait_ready(c)
            for red in (10, 250):
                r = await c.post("/predict", content=jpeg(red), headers={"Content-Type": "image/jpeg"})
                assert r.status_code == 200, r.text
                assert 'batch;desc="1"' in r.headers["server-timing"]
            assert r.json()["predictions"][0]["top"][0]["label"] == "bright"
            metrics = (await c.get("/metrics")).text
    inline = metric_sum(metrics, "imgserve_batches_total", model="fake", version="1", reason="inline")
    idle = metric_sum(metrics, "imgserve_batches_total", model="fake", version="1", reason="idle")
    assert (inline, idle) == ((2, 0) if inline_ms else (0, 2))
    assert metric_sum(metrics, "imgserve_rows_total", model="fake", version="1") == 2


async def test_requests_that_arrive_together_are_batched_not_run_inline_one_by_one(tmp_path: Path) -> None:
    """A row runs inline only when no other request is on its way. Requests whose bytes came in one poll
    of the event loop are all on their way: the first must not run inline, or each next one would find
    the model idle in turn and the server would answer one at a time on one core under load."""
    write_fake_version(tmp_path, "fake", 1, LABELS)
    REDS = (10, 40, 70, 100, 130, 160, 190, 220)  # noqa: N806
    settings = Settings(model_store=tmp_path, max_batch_delay_ms=20, poll_interval_s=0.05, inline_run_max_ms=2.0)
    app = create_app(settings, loader=lambda path, meta: FakeClassifier(meta))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            await wait_ready(c)
            lone = await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})
            assert lone.status_code == 200, lone.text
            before = (await c.get("/metrics")).text
            answers = await asyncio.gather(*(c.post("/predict", content=jpeg(red), headers={
                "Content-Type": "image/jpeg"}) for red in REDS))
            after = (await c.get("/metrics")).text

    def added(name: str, **labels: str) -> float:
        return metric_sum(after, name, model="fake", version="1", **labels) - metric_sum(
            before, name, model="fake", version="1", **labels)

    assert [r.status_code for r in answers] == [200] * 8
    assert [r.json()["predictions"][0]["top"][0]["label"] for r in answers] == ["dark"] * 3 + ["mid"] * 3 + ["bright"] * 2
    assert added("imgserve_rows_total") == 8
    assert added("imgserve_batches_total", reason="inline") == 0
    assert added("imgserve_batches_total") < 8


async def test_a_full_queue_is_refused_before_decoding(tmp_path: Path) -> None:
    """Past the queue's rows, a request is refused before its images are decoded: when the queue is
    full as it arrives (before its body is read) and when its images would not fit (once read)."""
    write_fake_version(tmp_path, "fake", 1, LABELS)
    gate = threading.Event()
    gate.set()  # warm-up runs freely

    class Held(FakeClassifier):
        def predict(self, images: np.ndarray) -> np.ndarray:
            gate.wait(30)
            return super().predict(images)

    async with app_client(tmp_path, loader=lambda p, m: Held(m), max_queue_rows=2, max_batch_size=1,
                          max_batch_delay_ms=0, inline_run_max_ms=0) as c:
        gate.clear()
        served = c.app.state.registry.served["fake"]  # type: ignore[attr-defined]

        def post(**kw: Any) -> asyncio.Task[httpx.Response]:
            kw = kw or {"content": jpeg(10), "headers": {"Content-Type": "image/jpeg"}}
            return asyncio.create_task(c.post("/predict", **kw))

        def decoded(text: str) -> float:
            return metric_sum(text, "imgserve_decode_seconds_count")

        running = post()
        await eventually(lambda: served.batcher.depth == 0 and served.inflight == 1, what="the first row running")
        queued = [post()]
        await eventually(lambda: served.batcher.depth == 1, what="one row queued")
        before = decoded((await c.get("/metrics")).text)
        two = [("file", (f"{i}.jpg", jpeg(10), "image/jpeg")) for i in range(2)]
        r = await c.post("/predict", files=two)  # 1 queued + 2 > 2 rows: read, then refused undecoded
        assert r.status_code == 429 and r.json()["code"] == "queue_full", r.text
        assert "2 more do not fit" in r.json()["error"]
        queued.append(post())
        await eventually(lambda: served.batcher.depth == 2, what="the queue full")
        r = await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 429 and r.json()["code"] == "queue_full"
        text = (await c.get("/metrics")).text
        assert decoded(text) == before + 1  # only the request that was queued was decoded
        assert metric_sum(text, "imgserve_rejections_total", reason="queue_full") == 2
        gate.set()
        assert [t.status_code for t in await asyncio.gather(running, *queued)] == [200, 200, 200]


async def test_the_other_per_model_batching_keys_override_the_settings(tmp_path: Path) -> None:
    """`batches_in_flight`, `max_queue_rows` and `flush_when_idle` in a version's `batching` block win over
    the service-wide settings, and the queue refuses past the model's own bound."""
    write_fake_version(tmp_path, "own", 1, LABELS,
                       batching={"batches_in_flight": 2, "max_queue_rows": 3, "flush_when_idle": False})
    write_fake_version(tmp_path, "plain", 1, LABELS)
    async with app_client(tmp_path, max_queue_rows=64, batches_in_flight=1, flush_when_idle=True,
                          inline_run_max_ms=0) as c:
        await eventually_async(lambda: c.get("/health/ready"),
                               lambda r: r.status_code == 200 and set(r.json()["models"]) == {"own", "plain"})
        served = c.app.state.registry.served  # type: ignore[attr-defined]
        own, plain = served["own"].batcher, served["plain"].batcher
        assert (own.batches_in_flight, own.max_queue_rows, own.flush_when_idle) == (2, 3, False)
        assert (plain.batches_in_flight, plain.max_queue_rows, plain.flush_when_idle) == (1, 64, True)
        files = [("file", (f"{i}.jpg", jpeg(10), "image/jpeg")) for i in range(4)]
        r = await c.post("/predict?model=own", files=files)  # 4 rows: more than the model's queue holds
        assert r.status_code == 429 and "3 rows" in r.json()["error"]
        assert (await c.post("/predict?model=plain", files=files)).status_code == 200
        text = (await c.get("/metrics")).text
        assert metric_sum(text, "imgserve_queue_capacity_rows", model="own") == 3


@pytest.mark.parametrize(("inline_max", "threads", "pooled"), [(300_000, 3, 0), (0, 3, 1), (100, 1, 1)])
async def test_decoding_runs_inline_or_in_the_pool_of_the_set_size(tmp_path: Path, inline_max: int, threads: int,
                                                                   pooled: int) -> None:
    """A lone image of at most IMGSERVE_INLINE_DECODE_MAX_PIXELS is decoded on the event loop; a larger one
    (or with 0, every one) in the decoding pool of IMGSERVE_DECODE_THREADS threads."""
    write_fake_version(tmp_path, "fake", 1, LABELS)
    async with app_client(tmp_path, inline_decode_max_pixels=inline_max, decode_threads=threads) as c:
        pool = c.app.state.decode_pool  # type: ignore[attr-defined]
        assert pool._max_workers == threads
        used: list[object] = []
        submit = pool.submit

        def counting(fn: Any, *args: Any) -> Any:
            used.append(fn)
            return submit(fn, *args)

        pool.submit = counting
        r = await c.post("/predict", content=jpeg(250), headers={"Content-Type": "image/jpeg"})  # 40 x 40 pixels
        assert r.status_code == 200 and r.json()["predictions"][0]["top"][0]["label"] == "bright"
        assert len(used) == pooled


@pytest.mark.parametrize("on", [True, False])
async def test_opentelemetry_spans_only_when_turned_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       on: bool) -> None:
    """IMGSERVE_OPENTELEMETRY hands each request to FastAPI's OpenTelemetry support (a span per request
    through the configured tracer provider); off, no span is started whatever the process configured."""
    from opentelemetry import trace

    spans: list[str] = []

    class Tracer(trace.NoOpTracer):
        def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
            spans.append(f"{name} {kwargs.get('attributes', {}).get('url.path')}")
            return super().start_span(name, *args, **kwargs)

    class Provider(trace.TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            return Tracer()

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: Provider())
    write_fake_version(tmp_path, "fake", 1, LABELS)
    async with app_client(tmp_path, opentelemetry=on) as c:
        spans.clear()
        r = await c.post("/predict", content=jpeg(250), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200
    assert spans == (["POST /predict"] if on else [])
