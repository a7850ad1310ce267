"""Multipart bodies read into memory with python-multipart's streaming parser.

Starlette's form parser (`request.form()`) is built for uploads of any size: it spools every file
part into a `SpooledTemporaryFile`, and on a body that ends before its closing boundary it leaves
that file unclosed. Our bodies are capped by IMGSERVE_MAX_UPLOAD_BYTES before they are read, so the
parts are kept as bytes: about a sixth of the event loop's time for a one-image upload
(`python -m bench.inprocess --multipart`), and a clear 400 for a body cut short.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header


class MultipartError(ValueError):
    """The body is not a well-formed multipart/form-data body, or has too many parts."""


@dataclass
class Part:
    name: str
    filename: str | None  # None: a text field (no `filename` in its Content-Disposition)
    content_type: str
    data: bytes


async def read_parts(chunks: AsyncIterator[bytes], content_type: str, max_parts: int) -> list[Part]:
    """Every part of the body, in order. Raises MultipartError for a malformed body or more than
    `max_parts` parts; whatever `chunks` raises (a disconnect, a body limit) goes through."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("the multipart content type has no boundary")
    parts: list[Part] = []
    data: list[bytes] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()
    ended = False

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        field.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        value.extend(buf[start:end])

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        data.append(buf[start:end])

    def on_part_end() -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise MultipartError(f"part {len(parts) + 1} has no Content-Disposition: form-data header with a name")
        if len(parts) >= max_parts:
            raise MultipartError(f"the body has more than {max_parts} parts")
        filename = options.get(b"filename")
        parts.append(Part(name=options[b"name"].decode("utf-8", "replace"),
                          filename=None if filename is None else filename.decode("utf-8", "replace"),
                          content_type=headers.get(b"content-type", b"").decode("latin-1"),
                          data=b"".join(data)))
        data.clear()
        headers.clear()

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end, "on_part_data": on_part_data,
                                        "on_part_end": on_part_end, "on_end": on_end})
    try:
        async for chunk in chunks:
            if chunk:
                parser.write(chunk)
    except FormParserError as exc:
        raise MultipartError(f"the multipart body is malformed ({exc})") from exc
    if not ended:
        raise MultipartError("the multipart body ends before its closing boundary")
    return parts
