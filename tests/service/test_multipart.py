"""service.api.multipart: python-multipart's parser collecting parts as bytes, and its refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from service.api.multipart import MultipartError, read_parts


def encoded(**kw: object) -> tuple[bytes, str]:
    """A body and content type exactly as httpx sends them."""
    req = httpx.Request("POST", "http://x/", **kw)  # type: ignore[arg-type]
    return req.read(), req.headers["content-type"]


async def chunked(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
async def test_parts_come_back_in_order_whatever_the_chunking(size: int) -> None:
    image = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    body, ctype = encoded(data={"note": "héllo"}, files=[("file", ("a.jpg", image, "image/jpeg")),
                                                           ("file", ("b.png", b"\x89PNG", "image/png"))])
    parts = await read_parts(chunked(body, size), ctype, 10)
    assert [(p.name, p.filename, p.content_type) for p in parts] == [
        ("note", None, ""), ("file", "a.jpg", "image/jpeg"), ("file", "b.png", "image/png")]
    assert parts[0].data == "héllo".encode() and parts[1].data == image and parts[2].data == b"\x89PNG"


async def refused(body: bytes, ctype: str, max_parts: int = 10) -> str:
    with pytest.raises(MultipartError) as info:
        await read_parts(chunked(body, 64), ctype, max_parts)
    return str(info.value)


async def test_bodies_that_are_refused_and_why() -> None:
    body, ctype = encoded(files={"file": ("a.jpg", b"x" * 500, "image/jpeg")})
    assert "closing boundary" in await refused(body[:-10], ctype)
    assert "closing boundary" in await refused(b"", ctype)
    assert "no boundary" in await refused(body, "multipart/form-data")
    assert "malformed" in await refused(b"\x00" * 100, ctype)
    many, many_type = encoded(files=[("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(4)])
    assert "more than 3 parts" in await refused(many, many_type, 3)
    assert len(await read_parts(chunked(many, 64), many_type, 4)) == 4
    nameless = b'--zz\r\nContent-Disposition: attachment; filename="a"\r\n\r\nabc\r\n--zz--\r\n'
    assert "no Content-Disposition" in await refused(nameless, "multipart/form-data; boundary=zz")
