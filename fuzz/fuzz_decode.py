"""Coverage-guided fuzzing of the image decoder with atheris.

    python fuzz/fuzz_decode.py -max_total_time=600      # on demand, longer
    python fuzz/fuzz_decode.py -runs=3000               # what CI runs

Any exception other than ImageError (a clean 4xx for the caller) is a crash.
"""

from __future__ import annotations

import io
import sys

import atheris

with atheris.instrument_imports():
    from PIL import Image

    from service.imaging import ImageError, decode_image


def seeds() -> list[bytes]:
    out = []
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (9, 7), (200, 30, 60)).save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = seeds()


def test_one_input(data: bytes) -> None:
    if len(data) > 1 and data[0] < 64:  # often start from a valid image and mutate it
        base = bytearray(SEEDS[data[0] % len(SEEDS)])
        for i, b in enumerate(data[1:65]):
            base[(i * 7 + b) % len(base)] = b
        data = bytes(base)
    try:
        out = decode_image(data, 16, 16, max_pixels=4_000_000)
    except ImageError:
        return
    assert out.shape == (16, 16, 3)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
