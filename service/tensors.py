"""KServe v2 tensors, whichever protocol carries them (REST JSON and binary data, or gRPC): images in,
probabilities or top-k classification strings out."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.errors import BadRequest
from service.loading import ServedVersion
from service.pipeline import Images, pixel_rows, top_k

ACCEPTS = "UINT8 [N, H, W, 3] pixels, or BYTES [N] encoded images (JPEG, PNG, WebP, BMP)"


def bytes_elements(buf: bytes) -> list[bytes]:
    """A BYTES tensor in binary form: each element is a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(buf):
        if i + 4 > len(buf):
            raise BadRequest("BYTES binary data ends inside an element length")
        (n,) = struct.unpack_from("<I", buf, i)
        i += 4
        if i + n > len(buf):
            raise BadRequest("BYTES binary data ends inside an element")
        out.append(buf[i : i + n])
        i += n
    return out


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def input_images(served: ServedVersion, datatype: str, shape: Sequence[int], *, raw: bytes | None = None,
                 elements: list[bytes] | None = None, values: Any = None) -> Images:
    """The images of the one input: BYTES as `raw` (binary form) or `elements`; UINT8 as `raw` bytes or
    `values` (numbers, nested or flat)."""
    shape = list(shape)
    n = shape[0] if shape else 0
    h, w = served.meta.input.height, served.meta.input.width
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"a BYTES input must have shape [N] or [N, 1], got {shape}")
        blobs = bytes_elements(raw) if raw is not None else list(elements or [])
        if len(blobs) != n:
            raise BadRequest(f"the shape says {n} elements but {len(blobs)} were sent")
        return Images(blobs=blobs)
    if datatype == "UINT8":
        if len(shape) != 4 or shape[1:] != [h, w, 3]:
            raise BadRequest(f"a UINT8 input must have shape [N, {h}, {w}, 3], got {shape}")
        if raw is not None:
            if len(raw) != n * h * w * 3:
                raise BadRequest(f"{len(raw)} bytes of UINT8 data do not match shape {shape}")
            return Images(pixels=list(np.frombuffer(raw, np.uint8).reshape(shape)))
        return Images(pixels=pixel_rows(values, h, w, shape))
    raise BadRequest(f"datatype {datatype!r} is not accepted: send BYTES (encoded images) or UINT8 (pixels)")


def classification_k(params: dict[str, Any]) -> int:
    """The `classification` parameter of a requested output (0: the probabilities themselves)."""
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise BadRequest("the classification parameter must be a non-negative integer")
    return k


def output_tensor(probs: np.ndarray, labels: list[str], k: int) -> tuple[str, list[int], list[bytes] | np.ndarray]:
    """The `probabilities` output: FP32 [N, C], or with k > 0 BYTES [N, k] of "score:index:label", best first."""
    probs = probs.astype(np.float32)
    if not k:
        return "FP32", list(probs.shape), probs
    k = min(k, probs.shape[1])
    strings = [f"{t['score']:.6f}:{t['index']}:{t['label']}".encode() for row in top_k(probs, labels, k) for t in row]
    return "BYTES", [len(probs), k], strings
