"""/predict's fast path (service.api.native.FastPath): a raw image or a multipart upload with a plainly valid
query and the right key skips FastAPI's routing and validation; every other request, and so every error answer, goes on to
the FastAPI route. Each request below is sent with the fast path on and with it off: the answers must be
the same, so that no client can tell which path served it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from service.api import native
from service.settings import Settings
from tests.support import LABELS, app_client, jpeg, write_fake_version

KEY = "s3cret-key"
VARYING = {"x-request-id", "server-timing", "date"}


@asynccontextmanager
async def serving(store: Path, api_key: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(store, max_batch_delay_ms=1, max_upload_bytes=200_000,
                          api_key=SecretStr(api_key) if api_key else None) as c:
        yield c


@pytest.fixture
def store(tmp_path: Path) -> Path:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    return tmp_path


def answer(r: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    return r.status_code, r.json() if r.content else None, {k: v for k, v in r.headers.items() if k not in VARYING}


async def both_ways(store: Path, monkeypatch: pytest.MonkeyPatch, api_key: str | None,
                    send: Callable[[httpx.AsyncClient], Any], fast_expected: bool) -> tuple[Any, Any]:
    """The answer with the fast path mounted and with it declining every request. With it mounted, the
    request must have been taken by it exactly when `fast_expected` (so a fast path that was unmounted,
    or that declined everything, fails here)."""
    took: list[bool] = []
    decide = native.FastPath._query

    def recording(scope: dict[str, Any]) -> Any:
        query = decide(scope)
        took.append(query is not None)
        return query

    with monkeypatch.context() as m:
        m.setattr(native.FastPath, "_query", staticmethod(recording))
        async with serving(store, api_key) as c:
            took.clear()  # readiness polls are GETs: not /predict
            fast = answer(await send(c))
    assert took == [fast_expected], f"fast path took the request: {took}, expected {fast_expected}"
    with monkeypatch.context() as m:
        m.setattr(native.FastPath, "_query", staticmethod(lambda scope: None))
        async with serving(store, api_key) as c:
            slow = answer(await send(c))
    return fast, slow


# query -> (status, taken by the fast path): a plainly valid query is; anything FastAPI must judge is not
QUERIES = {"": (200, True), "top_k=2": (200, True), "top_k=3&model=fake&version=1": (200, True),
           "model=fake": (200, True), "version=9": (404, True), "model=nope": (404, True),
           "top_k=0": (422, False), "top_k=1001": (422, False), "top_k=%2B2": (200, False), "top_k=%D9%A3": (422, False),
           "top_k=two": (422, False), "top_k=1&top_k=2": (200, False), "version=0": (422, False),
           "version=-1": (422, False), "model=": (200, False), "model=" + "x" * 65: (422, False),
           "unknown=1": (200, False), "label=stable": (200, True), "label=nope": (404, True),
           "label=Bad!": (400, True), "label=" + "x" * 33: (422, False), "version=1&label=stable": (400, True)}


@pytest.mark.parametrize("query", list(QUERIES))
async def test_a_raw_image_gets_the_same_answer_either_way(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                           query: str) -> None:
    status, fast_path = QUERIES[query]
    fast, slow = await both_ways(store, monkeypatch, None, lambda c: c.post(
        f"/predict?{query}", content=jpeg(250), headers={"Content-Type": "image/jpeg"}), fast_path)
    assert fast == slow
    assert fast[0] == status, fast
    if status == 200:
        assert fast[1]["predictions"][0]["top"][0]["label"] == "bright"


@pytest.mark.parametrize("headers", [{}, {"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY},
                                     {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}],
                         ids=["none", "bearer", "x-api-key", "wrong", "wrong-bearer"])
async def test_the_api_key_is_checked_the_same_either_way(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                          headers: dict[str, str]) -> None:
    right = KEY in "".join(headers.values())
    fast, slow = await both_ways(store, monkeypatch, KEY, lambda c: c.post(
        "/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg", **headers}), right)
    assert fast == slow
    assert fast[0] == (200 if right else 401)


@pytest.mark.parametrize(("body", "ctype", "status"), [
    (b"", "image/jpeg", 400), (b"not an image", "image/png", 415), (b"%PDF-1.7", "application/octet-stream", 415),
    (jpeg(128), "image/webp", 200)])  # the declared type is a hint: the bytes decide
async def test_bad_bodies_get_the_same_error_either_way(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                        body: bytes, ctype: str, status: int) -> None:
    fast, slow = await both_ways(store, monkeypatch, None, lambda c: c.post(
        "/predict", content=body, headers={"Content-Type": ctype}), True)
    assert fast == slow
    assert fast[0] == status, fast


MULTIPART: dict[str, dict[str, Any]] = {
    "one image": {"files": {"file": ("a.jpg", jpeg(200), "image/jpeg")}},
    "two images": {"files": [("file", ("a.jpg", jpeg(200), "image/jpeg")), ("file", ("b.jpg", jpeg(120), "image/jpeg"))]},
    "no file part": {"files": {"other": ("a.jpg", jpeg(100), "image/jpeg")}},
    "text field": {"data": {"file": "not a file"}, "files": {"x": ("x", b"x")}},
    "not an image": {"files": {"file": ("a.jpg", b"hello", "image/jpeg")}},
    "too many images": {"files": [("file", (f"{i}.jpg", jpeg(50), "image/jpeg")) for i in range(65)]},
    "no boundary": {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
    "garbage": {"content": b"\x00" * 64, "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
    "unterminated": {"content": b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
                     "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
}
MULTIPART_STATUS = {"one image": 200, "two images": 200, "not an image": 415, "too many images": 413}


@pytest.mark.parametrize("case", list(MULTIPART))
async def test_a_multipart_upload_gets_the_same_answer_either_way(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  case: str) -> None:
    fast, slow = await both_ways(store, monkeypatch, None, lambda c: c.post("/predict?top_k=2", **MULTIPART[case]),
                                 True)
    assert fast == slow
    assert fast[0] == MULTIPART_STATUS.get(case, 400), fast


def scope(query: bytes = b"", method: str = "POST", ctype: bytes = b"image/jpeg",
          key: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    class App:
        class state:  # noqa: N801 - stands in for app.state
            settings = Settings(api_key=SecretStr(key) if key else None)

    return {"type": "http", "method": method, "path": "/predict", "query_string": query, "app": App,
            "headers": [(b"content-type", ctype), *(headers or [])]}


def test_which_requests_take_the_fast_path() -> None:
    take = native.FastPath._query
    assert take(scope()) == (None, None, 5, None)
    assert take(scope(b"top_k=3&model=fake&version=2")) == ("fake", 2, 3, None)
    assert take(scope(b"label=canary")) == (None, None, 5, "canary")
    assert take(scope(ctype=b"application/octet-stream; x=1")) == (None, None, 5, None)
    assert take(scope(ctype=b"IMAGE/PNG")) == (None, None, 5, None)
    assert take(scope(key=KEY, headers=[(b"x-api-key", KEY.encode())])) == (None, None, 5, None)
    assert take(scope(b"top_k=2", ctype=b"multipart/form-data; boundary=x")) == (None, None, 2, None)
    for other in (scope(ctype=b"application/json"), scope(ctype=b"multipart/mixed; boundary=x"),
                  scope(method="GET"), scope(b"top_k=0"), scope(b"top_k=+1"), scope(b"version=0"),
                  scope(b"model="), scope(b"top_k=1&top_k=1"), scope(b"debug=1"), scope(key=KEY),
                  scope(key=KEY, headers=[(b"x-api-key", b"nope")])):
        assert take(other) is None, other
