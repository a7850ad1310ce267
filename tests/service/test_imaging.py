"""The shared decoder: formats, colour handling, EXIF orientation, limits."""

from __future__ import annotations

import io
import subprocess
import sys

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service import imaging
from service.imaging import ImageError, ImageTooLarge, UnsupportedImageFormat, decode_image
from tests.support import REPO


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def left_red_right_blue(w: int = 64, h: int = 32) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_formats_decode_to_rgb_at_target_size(fmt: str) -> None:
    out = decode_image(encode(left_red_right_blue(), fmt), 16, 20)
    assert out.shape == (16, 20, 3) and out.dtype == np.uint8
    assert out[8, 2, 0] > 200 and out[8, 2, 2] < 60  # left is red: channel order is RGB
    assert out[8, 17, 2] > 200 and out[8, 17, 0] < 60


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_colour_modes_are_converted(mode: str) -> None:
    img = left_red_right_blue().convert("RGB")
    img = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257) if mode == "I;16" else img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encode(img, fmt), 10, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    if mode in ("L", "LA", "I;16"):
        assert np.array_equal(out[..., 0], out[..., 1])  # grey stays grey
    else:
        assert out[5, 1, 0] > 180  # red survives palette, alpha and CMYK


def test_exif_orientation_is_applied() -> None:
    img = left_red_right_blue(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, to be shown rotated 90 degrees clockwise: red ends on top
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, 64, 32)
    assert out[2, 16, 0] > 200 and out[60, 16, 2] > 200


def test_reduced_decoding_matches_full_decoding() -> None:
    rng = np.random.default_rng(0)
    big = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (800, 600), interpolation=cv2.INTER_CUBIC)
    data = encode(Image.fromarray(big), "JPEG", quality=95)
    reduced = decode_image(data, 64, 64).astype(int)  # 600 >= 8 * 64: decoded at 1/8 by the codec
    full = cv2.resize(big, (64, 64), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(reduced - full).mean() < 6


def test_unsupported_and_broken() -> None:
    with pytest.raises(UnsupportedImageFormat):
        decode_image(b"%PDF-1.4 not an image", 8, 8)
    with pytest.raises(UnsupportedImageFormat, match="GIF"):
        decode_image(encode(left_red_right_blue(), "GIF"), 8, 8)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", 8, 8)
    png = encode(left_red_right_blue(), "PNG")
    with pytest.raises(ImageError):
        decode_image(png[: len(png) // 2], 8, 8)


def test_pixel_limit_checked_from_the_header() -> None:
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLarge, match="9000000"):
        decode_image(data, 8, 8, max_pixels=1_000_000)


def test_declared_giant_png_is_refused_without_decoding() -> None:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, 8, 8)


def test_a_png_chunk_longer_than_the_file_is_refused_before_opencv_allocates_it() -> None:
    # The fuzzer's find: a valid 9x7 PNG whose IDAT length field says 0xfa000014 (4 GB) made OpenCV's
    # reader allocate 4 GB for a 77-byte request. Measured in a fresh process: its peak RSS is the figure.
    code = """
import io, resource, sys
from PIL import Image
from service import imaging
from service.imaging import ImageError, decode_image
buf = io.BytesIO(); Image.new("RGB", (9, 7), (200, 30, 60)).save(buf, "PNG")
data = bytearray(buf.getvalue()); data[33] = 0xfa  # the first byte of the IDAT chunk's length
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(bytes(data), 16, 16)
    print("decoded")
except ImageError as exc:
    print(type(exc).__name__, exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    message, grown_mib = r.stdout.strip().splitlines()
    assert message.startswith("ImageError") and "truncated" in message and "'IDAT'" in message, message
    assert int(grown_mib) < 64, f"decoding 77 bytes grew the process by {grown_mib} MiB"


def test_a_side_longer_than_opencv_allows_is_too_large_and_the_codec_refusing_is_a_4xx(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the fuzzer's second find: a 1310729x1 BMP is under the pixel limit, but OpenCV asserts a side
    # of at most 2^20 and raised cv2.error, which no caller expects (a 500)
    long_bmp = encode(Image.new("RGB", (1_310_729, 1), (1, 2, 3)), "BMP")
    with pytest.raises(ImageTooLarge, match="1310729x1"):
        decode_image(long_bmp, 8, 8)
    monkeypatch.setattr(imaging, "MAX_SIDE", 1 << 22)  # past our check, OpenCV's own assertion is still a 4xx
    with pytest.raises(ImageError, match=r"BMP image could not be decoded \(\(-215:Assertion failed\)") as info:
        decode_image(long_bmp, 8, 8)
    assert "/io/opencv" not in str(info.value)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        out = decode_image(data, 8, 8)
    except ImageError:
        return
    assert out.shape == (8, 8, 3)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["JPEG", "PNG", "WEBP", "BMP"]), st.integers(1, 60), st.integers(1, 60),
       st.integers(0, 1000))
def test_mutated_images_never_crash(fmt: str, w: int, h: int, cut: int) -> None:
    data = encode(Image.new("RGB", (w, h), (10, 200, 30)), fmt)
    mutated = data[: max(1, len(data) - cut)]
    try:
        out = decode_image(mutated, 12, 12)
    except ImageError:
        return
    assert out.shape == (12, 12, 3)
