"""Run by tests/e2e/test_grpc.py in tritonclient's own environment: `tritonclient.grpc` as a Triton user
writes it, against this server. Prints one JSON document of what it saw.

    python triton_grpc.py TARGET MODEL KEY IMAGE...
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def status(fn: Any) -> str:
    try:
        fn()
    except InferenceServerException as exc:
        return f"{exc.status()} {exc.message()}"
    return "OK"


def main() -> None:
    target, model, key, *paths = sys.argv[1:]
    headers = {"authorization": f"Bearer {key}"} if key else None
    images = [Path(p).read_bytes() for p in paths]
    client = grpcclient.InferenceServerClient(url=target)
    out: dict[str, Any] = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                           "model_ready": client.is_model_ready(model), "unknown_ready": client.is_model_ready("nope")}
    meta = client.get_model_metadata(model, as_json=True)
    out["metadata"] = meta
    h, w = (int(d) for d in meta["inputs"][0]["shape"][1:3])

    inp = grpcclient.InferInput("images", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")],
                          request_id="t-1", headers=headers)
    out["probabilities"] = result.as_numpy("probabilities").tolist()
    out["response"] = result.get_response(as_json=True)
    top = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)],
                       headers=headers)
    out["top2"] = [[s.decode() for s in row] for row in top.as_numpy("probabilities")]
    pixels = grpcclient.InferInput("images", [1, h, w, 3], "UINT8")
    pixels.set_data_from_numpy(np.full((1, h, w, 3), 128, np.uint8))
    out["pixels"] = client.infer(model, [pixels], headers=headers).as_numpy("probabilities").tolist()

    bad = grpcclient.InferInput("images", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    out["errors"] = {
        "not_an_image": status(lambda: client.infer(model, [bad], headers=headers)),
        "unknown_model": status(lambda: client.infer("nope", [inp], headers=headers)),
        "unknown_version": status(lambda: client.infer(model, [inp], model_version="99", headers=headers)),
        "no_key": status(lambda: client.infer(model, [inp])),
    }

    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    for i in range(3):
        client.async_stream_infer(model, [bad if i == 1 else inp], request_id=f"s-{i}")
    stream = {}
    for _ in range(3):
        result, error = answers.get(timeout=60)
        if error is not None:
            stream[f"error-{len(stream)}"] = str(error)
        else:
            stream[result.get_response().id] = result.as_numpy("probabilities").tolist()
    client.stop_stream()
    out["stream"] = stream
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
