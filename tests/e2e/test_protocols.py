"""TF Serving REST and KServe v2 against a real uvicorn process, with the official tritonclient."""

from __future__ import annotations

import base64
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from service.imaging import load_image
from tests.support import LiveServer, Trained, clothing_images, metric_sum, served_runtime, start_server

pytestmark = pytest.mark.slow


def native_probs(server: LiveServer, paths: list[Path], k: int) -> np.ndarray:
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    body = httpx.post(server.url + "/predict", files=files, params={"top_k": k}, timeout=30).json()
    out = np.zeros((len(paths), k))
    for i, pred in enumerate(body["predictions"]):
        for t in pred["top"]:
            out[i, t["index"]] = t["score"]
    return out


@pytest.fixture
def triton_client(live: LiveServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=live.url.removeprefix("http://"), network_timeout=30)


def test_tritonclient_health_and_metadata(triton_client: triton.InferenceServerClient, trained: Trained) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("clothing")
    assert triton_client.is_model_ready("clothing", str(trained.version))
    assert not triton_client.is_model_ready("nope")
    meta = triton_client.get_server_metadata()
    assert "classification" in meta["extensions"] and "binary_tensor_data" in meta["extensions"]
    mm = triton_client.get_model_metadata("clothing")
    assert mm["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 48, 48, 3]}
    assert mm["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(trained.labels)]}


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_bytes_images(triton_client: triton.InferenceServerClient, live: LiveServer,
                                         trained: Trained, binary: bool) -> None:
    paths = clothing_images(4)
    k = len(trained.labels)
    if binary:
        data = np.array([p.read_bytes() for p in paths], dtype=np.object_)
    else:  # JSON carries BYTES as strings: base64 for binary images
        data = np.array([base64.b64encode(p.read_bytes()) for p in paths], dtype=np.object_)
    inp = triton.InferInput("images", [len(paths)], "BYTES")
    inp.set_data_from_numpy(data, binary_data=binary)
    out = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = triton_client.infer("clothing", [inp], outputs=[out], request_id="req-7")
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (4, k)
    np.testing.assert_allclose(probs, native_probs(live, paths, k), atol=1e-5)
    assert result.get_response()["id"] == "req-7"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_uint8_pixels(triton_client: triton.InferenceServerClient, live: LiveServer,
                                         trained: Trained, binary: bool) -> None:
    paths = clothing_images(3)
    pixels = np.stack([load_image(p, 48, 48) for p in paths])
    inp = triton.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    result = triton_client.infer("clothing", [inp], model_version=str(trained.version))
    np.testing.assert_allclose(result.as_numpy("probabilities"), native_probs(live, paths, len(trained.labels)),
                               atol=1e-5)


def test_tritonclient_classification_extension(triton_client: triton.InferenceServerClient, live: LiveServer,
                                               trained: Trained) -> None:
    paths = clothing_images(2)
    inp = triton.InferInput("images", [2], "BYTES")
    inp.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=np.object_))
    out = triton.InferRequestedOutput("probabilities", class_count=3)
    classes = triton_client.infer("clothing", [inp], outputs=[out]).as_numpy("probabilities")
    assert classes.shape == (2, 3)
    native = httpx.post(live.url + "/predict", files=[("file", (p.name, p.read_bytes())) for p in paths],
                        params={"top_k": 3}).json()["predictions"]
    for row, pred in zip(classes, native, strict=True):
        parsed = [c.decode().split(":") for c in row]
        assert [int(p[1]) for p in parsed] == [t["index"] for t in pred["top"]]
        assert [p[2] for p in parsed] == [t["label"] for t in pred["top"]]
        assert [float(p[0]) for p in parsed] == pytest.approx([t["score"] for t in pred["top"]], abs=1e-5)


def test_tf_serving_rest_as_documented(live: LiveServer, trained: Trained) -> None:
    paths = clothing_images(3)
    k = len(trained.labels)
    want = native_probs(live, paths, k)
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    pixels = np.stack([load_image(p, 48, 48) for p in paths]).tolist()
    url = live.url + "/v1/models/clothing"
    cases = [
        (url + ":predict", {"instances": [{"b64": b} for b in b64]}, "predictions"),
        (url + ":predict", {"signature_name": "serving_default", "instances": [{"images": {"b64": b}} for b in b64]},
         "predictions"),
        (url + f"/versions/{trained.version}:predict", {"instances": pixels}, "predictions"),
        (url + ":predict", {"inputs": {"images": [{"b64": b} for b in b64]}}, "outputs"),
        (url + ":predict", {"inputs": pixels}, "outputs"),
    ]
    for target, body, key in cases:
        r = httpx.post(target, json=body, timeout=30)
        assert r.status_code == 200, (target, r.text)
        np.testing.assert_allclose(np.asarray(r.json()[key]), want, atol=1e-5)
    status = httpx.get(url).json()
    assert status["model_version_status"][0] == {"version": str(trained.version), "state": "AVAILABLE",
                                                 "status": {"error_code": "OK", "error_message": ""}}
    meta = httpx.get(url + "/metadata").json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert [d["size"] for d in sig["outputs"]["probabilities"]["tensor_shape"]["dim"]] == ["-1", str(k)]


def test_all_protocols_share_batches(trained: Trained, tmp_path: Path) -> None:
    """One request per protocol, with a batch that closes only when it holds three rows: the three rows
    are run together, as one batch, and each caller gets its own answer."""
    shutil.copytree(trained.store, tmp_path / "store")
    server = start_server(tmp_path / "store", tmp_path, IMGSERVE_MAX_BATCH_SIZE="3", IMGSERVE_MAX_BATCH_DELAY_MS="10000",
                          IMGSERVE_FLUSH_WHEN_IDLE="false", IMGSERVE_INLINE_RUN_MAX_MS="0",
                          IMGSERVE_WARMUP_BATCH_SIZES="1,3")
    try:
        paths = clothing_images(3)
        host = server.url.removeprefix("http://")

        def native() -> list[float]:
            r = httpx.post(server.url + "/predict?top_k=1", files={"file": (paths[0].name, paths[0].read_bytes())},
                           timeout=60)
            assert r.status_code == 200, r.text
            return [r.json()["predictions"][0]["top"][0]["index"]]

        def tfs() -> list[float]:
            b64 = base64.b64encode(paths[1].read_bytes()).decode()
            r = httpx.post(server.url + "/v1/models/clothing:predict", json={"instances": [{"b64": b64}]}, timeout=60)
            assert r.status_code == 200, r.text
            return [int(np.argmax(r.json()["predictions"][0]))]

        def kserve() -> list[float]:
            inp = triton.InferInput("images", [1], "BYTES")
            inp.set_data_from_numpy(np.array([paths[2].read_bytes()], dtype=np.object_))
            out = triton.InferenceServerClient(url=host, network_timeout=60).infer("clothing", [inp])
            return [int(np.argmax(out.as_numpy("probabilities")[0]))]

        before = server.metrics()
        with ThreadPoolExecutor(3) as pool:
            got = [f.result() for f in [pool.submit(native), pool.submit(tfs), pool.submit(kserve)]]
        after = server.metrics()
        batches = metric_sum(after, "imgserve_batch_size_count") - metric_sum(before, "imgserve_batch_size_count")
        rows = metric_sum(after, "imgserve_batch_size_sum") - metric_sum(before, "imgserve_batch_size_sum")
        assert (rows, batches) == (3, 1)  # the three protocols' rows were run together
        # each caller got its own image's answer
        model = served_runtime(trained)
        together = model.predict(np.stack([load_image(p, trained.height, trained.width) for p in paths]))
        assert [g[0] for g in got] == [int(i) for i in together.argmax(1)]
    finally:
        server.stop()
