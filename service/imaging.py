"""The one image decoding function used by training and serving alike (OpenCV, RGB, uint8)."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# the pixel limit is checked below, from the header; Pillow's own warning for large images is noise (a
# process-wide filter, set once: a catch_warnings block per request costs more than the probe)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Formats we accept, by the name Pillow gives them when it reads the header.
ACCEPTED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
DEFAULT_MAX_PIXELS = 40_000_000
MAX_SIDE = 1 << 20  # OpenCV's CV_IO_MAX_IMAGE_WIDTH and _HEIGHT: a longer side is an assertion error in imdecode
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))

cv2.setNumThreads(1)  # decoding runs in our own thread pool; OpenCV's pool would oversubscribe the cores


class ImageError(ValueError):
    """An image that cannot be used; `code` names the reason (the service maps it to an HTTP status)."""

    code = "invalid_image"


class UnsupportedImageFormat(ImageError):
    code = "unsupported_media_type"


class ImageTooLarge(ImageError):
    code = "image_too_large"


def sniff(data: bytes) -> str | None:
    """The format named by the file's magic bytes, when it is one we accept."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunk declares more bytes than the file holds.

    OpenCV's PNG reader sizes its buffer from the declared chunk length before reading it, so a 77-byte
    file declaring a 4 GB chunk makes it allocate 4 GB (found by the fuzzer); Pillow's header probe
    does not read that far. A valid PNG never has such a chunk, so this is a truncated file.
    """
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > end - pos - 12:  # the chunk's data and its 4-byte CRC must both be there
            raise ImageError(
                f"the PNG image is truncated: its {kind.decode('latin-1')!r} chunk at byte {pos} declares "
                f"{length} bytes, more than the {max(end - pos - 12, 0)} left"
            )
        if kind == b"IEND":
            return
        pos += 12 + length


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read only the header: format and size. Refuses unknown formats and too many pixels before decoding."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "", img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image declares more pixels than the limit of {max_pixels}") from exc
    except Exception as exc:  # Pillow raises many types for data that is not an image
        magic = sniff(data)
        if magic is not None:
            raise ImageError(f"the {magic} image is corrupt or truncated (its header cannot be read)") from exc
        raise UnsupportedImageFormat(
            "the data is not an image in a supported format (JPEG, PNG, WebP, BMP)"
        ) from exc
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedImageFormat(f"{fmt or 'this'} images are not supported; send JPEG, PNG, WebP or BMP")
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if max(width, height) > MAX_SIDE:
        raise ImageTooLarge(f"the image is {width}x{height}; no side may be longer than {MAX_SIDE} pixels")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if fmt == "PNG":
        check_png_chunks(data)
    return ImageInfo(fmt, width, height)


def decode_image(data: bytes, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 info: ImageInfo | None = None) -> np.ndarray:
    """Decode encoded image bytes to a `(height, width, 3)` uint8 RGB array.

    EXIF orientation is applied; grey, palette, alpha (dropped) and 16-bit images become 8-bit RGB.
    JPEGs whose short side is at least twice the target are decoded at 1/2, 1/4 or 1/8 scale by the
    codec itself, which is several times faster. The image is then resized (area interpolation when
    shrinking) to exactly the target size, without keeping the aspect ratio. `info`: the header as
    `probe` read it, when the caller already has it.
    """
    info = info or probe(data, max_pixels)
    flags = cv2.IMREAD_COLOR
    short_side, target = min(info.width, info.height), max(height, width)
    for factor, reduced in _REDUCED_FLAGS:
        if short_side >= factor * target:
            flags = reduced
            break
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:  # the codec's own checks refused it: that is this image's fault, not the server's
        raise ImageError(f"the {info.format} image could not be decoded ({_first_line(exc)})") from exc
    if img is None or img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(f"the {info.format} image could not be decoded (corrupt or truncated data)")
    if img.shape[0] != height or img.shape[1] != width:
        shrinking = img.shape[0] * img.shape[1] > height * width
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _first_line(exc: Exception) -> str:
    """OpenCV's message without its build path: '(-215:Assertion failed) size.width <= ... in function ...'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0].rpartition(" error: ")[2] if lines else type(exc).__name__)[:200]


def load_image(path: Path, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode_image` on a file."""
    return decode_image(Path(path).read_bytes(), height, width, max_pixels)
