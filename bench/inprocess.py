"""Event-loop CPU time per /predict request, in one process, with no sockets and no load generator.

    python -m bench.inprocess                            # this checkout
    python -m bench.inprocess --code /tmp/before         # another checkout of this project, same venv
    python -m bench.inprocess --size 224                 # a VGG16-sized input (the photo is scaled down)
    python -m bench.inprocess --size 224 --presized      # the client sent a JPEG already at 224x224
    python -m bench.inprocess --multipart                # the photo as a multipart part named `file`

The app is driven through ASGI directly, one request at a time, with a model that costs nothing (it
answers a fixed row), so the figure is what the HTTP framework, the pipeline and the decoder cost the
event loop's thread (`time.thread_time`). It does not count uvicorn's parsing or the sockets; it is
free of the noise a load generator on the same cores brings to `bench.cpu`, so a change to the request
path can be compared before and after in seconds. The decoder's own cost is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.fakes import ConstantModel, publish_fake
from bench.harness import DEFAULT_IMAGES

BOUNDARY = b"bench0b0undary7f3c1a"


def multipart(image: bytes, filename: str) -> tuple[bytes, bytes]:
    """(body, content type) of an upload as browsers and HTTP clients send it: one part named `file`."""
    body = (b"--" + BOUNDARY + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="' + filename.encode() + b'"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--" + BOUNDARY + b"--\r\n")
    return body, b"multipart/form-data; boundary=" + BOUNDARY


async def measure(image: bytes, requests: int, rounds: int, query: bytes, size: int = 64,
                  as_multipart: bool = False) -> dict[str, Any]:
    from service.app import create_app
    from service.imaging import decode_image
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="imgserve-inprocess-") as tmp:
        store = Path(tmp)
        publish_fake(store, "m", [f"class-{i}" for i in range(10)], size)
        app = create_app(Settings(model_store=store, log_level="WARNING", grpc_port=0),
                         loader=lambda p, m: ConstantModel(m))
        body, ctype = multipart(image, "photo.jpg") if as_multipart else (image, b"image/jpeg")
        headers = [(b"host", b"bench"), (b"content-type", ctype), (b"content-length", str(len(body)).encode())]

        async def one() -> None:
            sent: list[dict[str, Any]] = []
            delivered = False

            async def receive() -> dict[str, Any]:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()  # the client never goes away
                return {}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": query,
                     "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                     "state": {}}
            await app(scope, receive, send)
            if sent[0]["status"] != 200:
                raise RuntimeError(f"/predict answered {sent[0]['status']}: {sent[-1].get('body', b'')[:300]!r}")

        async with app.router.lifespan_context(app):
            registry = app.state.registry
            for _ in range(600):
                if registry.ready:
                    break
                await asyncio.sleep(0.05)
            for _ in range(max(100, requests // 10)):
                await one()
            per_request, decode = [], []
            for _ in range(rounds):
                t = time.thread_time()
                for _ in range(requests):
                    await one()
                per_request.append((time.thread_time() - t) / requests * 1e6)
                t = time.thread_time()
                for _ in range(requests):
                    decode_image(image, size, size)
                decode.append((time.thread_time() - t) / requests * 1e6)
    return {"us_per_request": statistics.median(per_request), "us_decode": statistics.median(decode),
            "rounds_us_per_request": per_request, "rounds_us_decode": decode}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--code", type=Path, default=None, help="a checkout of this project to measure (default: this one)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--query", default="top_k=5")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--size", type=int, default=64, help="the model's input height and width")
    p.add_argument("--presized", action="store_true",
                   help="send the photo re-encoded at --size x --size (JPEG quality 90), as a client that resizes")
    p.add_argument("--multipart", action="store_true", help="send the image as a multipart part named `file`")
    args = p.parse_args()
    if args.code is not None:  # its service package, not ours
        sys.path.insert(0, str(args.code.resolve()))
        for name in [m for m in sys.modules if m == "service" or m.startswith("service.")]:
            del sys.modules[name]
    os.environ.setdefault("IMGSERVE_LOG_LEVEL", "WARNING")
    image = sorted(args.images.rglob("*.jpg"))[0]
    body = image.read_bytes()
    if args.presized:
        import cv2

        pixels = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        small = cv2.resize(pixels, (args.size, args.size), interpolation=cv2.INTER_AREA)
        body = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    res = asyncio.run(measure(body, args.requests, args.rounds, args.query.encode(), args.size, args.multipart))
    res.update(code=str((args.code or Path(".")).resolve()), image=str(image), requests=args.requests,
               size=args.size, presized=args.presized, multipart=args.multipart,
               body_bytes=len(multipart(body, "photo.jpg")[0] if args.multipart else body))
    print(f"{res['us_per_request']:.0f} us of event-loop CPU a request ({res['us_decode']:.0f} us of it the "
          f"decoder's), median of {args.rounds} rounds of {args.requests}: {res['code']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
