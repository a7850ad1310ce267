"""The bad-input catalogue, against a real uvicorn: every case gets a 4xx JSON error naming the
problem, the server stays live, and a good request sent alongside is unaffected."""

from __future__ import annotations

import base64
import io
import re
import select
import shutil
import signal
import socket
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import REPO, LiveServer, Trained, clothing_images, start_server

pytestmark = pytest.mark.slow
SERVER_PROCESSES = ["1", "2"]  # see conftest.py


def enc(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(w: int = 50_000, h: int = 50_000) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


REAL = clothing_images(1)[0].read_bytes() if clothing_images(1) else b""
PNG = enc(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG")
GIF = enc(Image.new("RGB", (20, 20)), "GIF")
# a valid PNG whose IDAT declares a 4 GB chunk in 77 bytes: OpenCV's reader allocated the 4 GB (the fuzzer's find)
LYING_CHUNK = bytes(PNG[:33]) + b"\xfa" + bytes(PNG[34:])
ANIMATED_GIF = b""
_frames = [Image.new("P", (20, 20), i) for i in range(3)]
_buf = io.BytesIO()
_frames[0].save(_buf, "GIF", save_all=True, append_images=_frames[1:])
ANIMATED_GIF = _buf.getvalue()
B64 = base64.b64encode(REAL).decode()

# (id, method, path, kwargs, expected status)
CASES: list[tuple[str, str, dict[str, Any], int]] = [
    # native /predict
    ("empty body raw", "/predict", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400),
    ("zero-byte file", "/predict", {"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400),
    ("text named .jpg", "/predict", {"files": {"file": ("a.jpg", b"hello world", "image/jpeg")}}, 415),
    ("pdf named .jpg", "/predict", {"files": {"file": ("a.jpg", b"%PDF-1.7\n%\xe2\xe3\n1 0 obj", "image/jpeg")}}, 415),
    ("truncated jpeg", "/predict", {"files": {"file": ("a.jpg", REAL[: len(REAL) // 2], "image/jpeg")}}, 400),
    ("truncated jpeg 99%", "/predict", {"files": {"file": ("a.jpg", REAL[: int(len(REAL) * .99)], "image/jpeg")}}, 400),
    ("truncated png", "/predict", {"files": {"file": ("a.png", PNG[: len(PNG) // 2], "image/png")}}, 400),
    ("png chunk longer than the file", "/predict", {"content": LYING_CHUNK, "headers": {"Content-Type": "image/png"}}, 400),
    ("jpeg header only", "/predict", {"files": {"file": ("a.jpg", REAL[:200], "image/jpeg")}}, 400),
    ("gif", "/predict", {"files": {"file": ("a.gif", GIF, "image/gif")}}, 415),
    ("animated gif", "/predict", {"files": {"file": ("a.gif", ANIMATED_GIF, "image/gif")}}, 415),
    ("decompression bomb", "/predict", {"content": png_bomb(), "headers": {"Content-Type": "image/png"}}, 413),
    ("bomb in multipart", "/predict", {"files": {"file": ("b.png", png_bomb(), "image/png")}}, 413),
    ("too many images", "/predict", {"files": [("file", (f"{i}.jpg", REAL, "image/jpeg")) for i in range(5)]}, 413),
    ("no file part", "/predict", {"files": {"other": ("a.jpg", REAL, "image/jpeg")}}, 400),
    ("file as text field", "/predict", {"data": {"file": "not a file"}, "files": {"x": ("x", b"x")}}, 400),
    ("thousands of fields", "/predict", {"data": {f"f{i}": "x" for i in range(3000)}, "files": {"file": ("a.jpg", REAL)}}, 400),
    ("text/plain body", "/predict", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415),
    ("json body", "/predict", {"json": {"image": "x"}}, 415),
    ("no content type", "/predict", {"content": REAL, "headers": {"Content-Type": ""}}, 415),
    ("top_k 0", "/predict?top_k=0", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 422),
    ("top_k -1", "/predict?top_k=-1", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 422),
    ("top_k 1e9", "/predict?top_k=1000000000", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 422),
    ("top_k text", "/predict?top_k=many", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 422),
    ("unknown model", "/predict?model=nope", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 404),
    ("model ../x", "/predict?model=../x", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 404),
    ("version 0", "/predict?version=0", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 422),
    ("version -1", "/predict?version=-1", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 422),
    ("version text", "/predict?version=latest", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 422),
    ("version not loaded", "/predict?version=99", {"content": REAL, "headers": {"Content-Type": "image/jpeg"}}, 404),
    ("bad timeout header", "/predict", {"content": REAL, "headers": {"Content-Type": "image/jpeg",
                                                                       "X-Request-Timeout-Ms": "-5"}}, 400),
    ("report traversal", "/v1/models/clothing/versions/1/report/..%2F..%2Fmodel.json", {"method": "GET"}, 404),
    # TensorFlow Serving REST
    ("tfs invalid base64", "/v1/models/clothing:predict", {"json": {"instances": [{"b64": "%%%"}]}}, 400),
    ("tfs not an object", "/v1/models/clothing:predict", {"json": [1, 2, 3]}, 400),
    ("tfs not json", "/v1/models/clothing:predict", {"content": b"{", "headers": {"Content-Type": "application/json"}}, 400),
    ("tfs missing instances", "/v1/models/clothing:predict", {"json": {}}, 400),
    ("tfs instances wrong type", "/v1/models/clothing:predict", {"json": {"instances": {"b64": B64}}}, 400),
    ("tfs b64 wrong type", "/v1/models/clothing:predict", {"json": {"instances": [{"b64": 12}]}}, 400),
    ("tfs wrong pixel shape", "/v1/models/clothing:predict", {"json": {"instances": [[[0, 0, 0]]]}}, 400),
    ("tfs ragged pixels", "/v1/models/clothing:predict", {"json": {"instances": [[[0, 0]], [[0]]]}}, 400),
    ("tfs too many", "/v1/models/clothing:predict", {"json": {"instances": [{"b64": B64}] * 5}}, 413),
    ("tfs unknown model", "/v1/models/nope:predict", {"json": {"instances": [{"b64": B64}]}}, 404),
    ("tfs version 0", "/v1/models/clothing/versions/0:predict", {"json": {"instances": [{"b64": B64}]}}, 404),
    ("tfs version text", "/v1/models/clothing/versions/x:predict", {"json": {"instances": [{"b64": B64}]}}, 404),
    ("tfs text image", "/v1/models/clothing:predict",
     {"json": {"instances": [{"b64": base64.b64encode(b"plain text").decode()}]}}, 415),
    ("tfs png chunk longer than the file", "/v1/models/clothing:predict",
     {"json": {"instances": [{"b64": base64.b64encode(LYING_CHUNK).decode()}]}}, 400),
    ("tfs xml", "/v1/models/clothing:predict", {"content": b"<a/>", "headers": {"Content-Type": "application/xml"}}, 415),
    # KServe v2
    ("kserve wrong datatype", "/v2/models/clothing/infer",
     {"json": {"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]}}, 400),
    ("kserve wrong shape", "/v2/models/clothing/infer",
     {"json": {"inputs": [{"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}]}}, 400),
    ("kserve bad base64", "/v2/models/clothing/infer",
     {"json": {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}}, 400),
    ("kserve count mismatch", "/v2/models/clothing/infer",
     {"json": {"inputs": [{"name": "images", "shape": [3], "datatype": "BYTES", "data": [B64]}]}}, 400),
    ("kserve too many rows", "/v2/models/clothing/infer",
     {"json": {"inputs": [{"name": "images", "shape": [5], "datatype": "BYTES", "data": [B64] * 5}]}}, 413),
    ("kserve missing inputs", "/v2/models/clothing/infer", {"json": {"id": "1"}}, 400),
    ("kserve inputs not list", "/v2/models/clothing/infer", {"json": {"inputs": {"name": "images"}}}, 400),
    ("kserve not json", "/v2/models/clothing/infer", {"content": b"\x00\x01", "headers": {"Content-Type": "application/json"}}, 400),
    ("kserve bad header length", "/v2/models/clothing/infer",
     {"content": b"{}", "headers": {"Inference-Header-Content-Length": "999"}}, 400),
    ("kserve unknown output", "/v2/models/clothing/infer",
     {"json": {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [B64]}],
               "outputs": [{"name": "nope"}]}}, 400),
    ("kserve unknown model", "/v2/models/nope/infer",
     {"json": {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [B64]}]}}, 404),
    ("kserve version -1", "/v2/models/clothing/versions/-1/infer",
     {"json": {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [B64]}]}}, 404),
    ("kserve negative shape", "/v2/models/clothing/infer",
     {"json": {"inputs": [{"name": "images", "shape": [-1], "datatype": "BYTES", "data": [B64]}]}}, 400),
]


@pytest.fixture(scope="module")
def server(trained: Trained, tmp_path_factory: pytest.TempPathFactory, server_processes: int) -> Iterator[LiveServer]:
    """One per process count (a module fixture that did not name `server_processes` served both counts' tests
    from the first server started)."""
    tmp = tmp_path_factory.mktemp("badinput")
    shutil.copytree(trained.store, tmp / "store")
    s = start_server(tmp / "store", tmp, IMGSERVE_MAX_IMAGES_PER_REQUEST="4", IMGSERVE_MAX_UPLOAD_BYTES="2000000",
                     IMGSERVE_BODY_TIMEOUT_S="2", IMGSERVE_MAX_FORM_FIELDS="100")
    assert len(s.workers()) == server_processes
    yield s
    s.stop(signal.SIGKILL)


def test_the_catalogue_is_what_the_reliability_page_says() -> None:
    assert len({c[0] for c in CASES}) == len(CASES), "case names are unique"
    said = re.search(r"- (\d+) catalogued cases", (REPO / "docs" / "reliability.md").read_text())
    assert said is not None and int(said.group(1)) == len(CASES), "docs/reliability.md counts the cases"


@pytest.mark.parametrize(("name", "path", "kwargs", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx(server: LiveServer, name: str, path: str, kwargs: dict[str, Any],
                                    status: int) -> None:
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        body = r.json()
        assert isinstance(body["error"], str) and len(body["error"]) > 5
        good = client.post("/predict", content=REAL, headers={"Content-Type": "image/jpeg"})
        assert good.status_code == 200
    assert server.proc.poll() is None


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "P", "RGBA", "LA"])
def test_unusual_colour_images_work(server: LiveServer, mode: str) -> None:
    base = Image.open(io.BytesIO(REAL)).convert("RGB").resize((60, 80))
    img = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257) if mode == "I;16" else base.convert(mode)
    data = enc(img, "JPEG" if mode in ("L", "CMYK") else "PNG")
    r = httpx.post(server.url + "/predict", files={"file": ("x", data)}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top"][0]["score"] > 0


def test_one_pixel_jpeg_works(server: LiveServer) -> None:
    r = httpx.post(server.url + "/predict", files={"file": ("x.jpg", enc(Image.new("RGB", (1, 1)), "JPEG"))})
    assert r.status_code == 200


def test_exif_rotated_photo_is_classified_upright(server: LiveServer) -> None:
    upright = Image.open(io.BytesIO(REAL)).convert("RGB")
    stored = upright.rotate(90, expand=True)  # what a camera stores, with orientation 6 to undo it
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = enc(stored, "JPEG", exif=exif.tobytes(), quality=95)
    plain = enc(upright, "JPEG", quality=95)
    a = httpx.post(server.url + "/predict", files={"file": ("r.jpg", rotated)}, params={"top_k": 3}).json()
    b = httpx.post(server.url + "/predict", files={"file": ("p.jpg", plain)}, params={"top_k": 3}).json()
    sa = [t["score"] for t in a["predictions"][0]["top"]]
    sb = [t["score"] for t in b["predictions"][0]["top"]]
    assert [t["index"] for t in a["predictions"][0]["top"]] == [t["index"] for t in b["predictions"][0]["top"]]
    assert sa == pytest.approx(sb, abs=0.02)


def test_oversized_upload_refused_without_reading_it(server: LiveServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 500000000\r\n\r\n")  # 500 MB announced, none sent
        answer = b""
        while chunk := s.recv(4096):  # the server answers and closes without waiting for the body (else: timeout)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"limit" in answer


def test_chunked_upload_over_the_limit(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 100_000

    r = httpx.post(server.url + "/predict", content=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_slow_client_times_out_and_nobody_else_waits(server: LiveServer) -> None:
    """A body that trickles in gets 408 after IMGSERVE_BODY_TIMEOUT_S (2 s here); requests on other
    connections are answered meanwhile: the first of them before the slow one's answer exists."""
    host, port = server.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=30)
    slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
                 + REAL[:1])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/predict", content=REAL, headers={"Content-Type": "image/jpeg"})
            pending, _, _ = select.select([slow], [], [], 0)
            assert r.status_code == 200 and not pending, "another connection waited for the slow body"
            for _ in range(4):
                assert client.post("/predict", content=REAL, headers={"Content-Type": "image/jpeg"}).status_code == 200
        answer = slow.recv(4096)  # the server gives up on the body by itself
    finally:
        slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
