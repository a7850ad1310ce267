"""Malformed TF Serving and KServe v2 requests get the protocol's error shape and a 4xx; the
repository extension honours the admin key."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.settings import Settings
from tests.support import LABELS, FakeClassifier, eventually_async, jpeg, metric_sum, wait_ready, write_fake_version

B64 = base64.b64encode(jpeg(250)).decode()
PIX = [[[0, 0, 0]] * 16] * 16


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    settings = Settings(model_store=tmp_path, max_batch_delay_ms=5, poll_interval_s=0.05,
                        max_images_per_request=3, admin_api_key="s3cret")  # type: ignore[arg-type]
    app = create_app(settings, loader=lambda path, meta: FakeClassifier(meta))
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c:
            await wait_ready(c)
            yield c


async def test_tf_serving_happy_paths(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models/fake:predict", json={"instances": [{"b64": B64}, {"b64": B64}]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert r.json()["predictions"][0][2] == pytest.approx(0.9)
    r = await client.post("/v1/models/fake/versions/1:predict", json={"inputs": [PIX]})
    assert r.status_code == 200 and r.json()["outputs"][0][0] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/models/fake:predict", {"instances": [{"b64": "!!not base64!!"}]}, 400, "base64"),
        ("/v1/models/fake:predict", b"{not json", 400, "JSON"),
        ("/v1/models/fake:predict", [1, 2], 400, "object"),
        ("/v1/models/fake:predict", {"foo": 1}, 400, "instances"),
        ("/v1/models/fake:predict", {"instances": [], "inputs": []}, 400, "exactly one"),
        ("/v1/models/fake:predict", {"instances": []}, 400, "no instances"),
        ("/v1/models/fake:predict", {"instances": "abc"}, 400, "list"),
        ("/v1/models/fake:predict", {"instances": [[[1, 2, 3]]]}, 400, "shape"),
        ("/v1/models/fake:predict", {"instances": [[[[300, 0, 0]] * 16] * 16]}, 400, "between 0 and 255"),
        ("/v1/models/fake:predict", {"instances": [[[[0.5, 0, 0]] * 16] * 16]}, 400, "integers"),
        ("/v1/models/fake:predict", {"instances": [{"b64": 5}]}, 400, "string"),
        ("/v1/models/fake:predict", {"instances": [{"b64": B64}, PIX]}, 400, "mixing"),
        ("/v1/models/fake:predict", {"instances": [{"x": 1}]}, 400, "instance"),
        ("/v1/models/fake:predict", {"signature_name": "other", "instances": [PIX]}, 400, "signature"),
        ("/v1/models/fake:predict", {"inputs": {"pixels": [PIX]}}, 400, "unknown inputs"),
        ("/v1/models/fake:predict", {"instances": [{"b64": base64.b64encode(b"text").decode()}]}, 415, "JPEG"),
        ("/v1/models/fake:predict", {"instances": [PIX] * 4}, 413, "limit is 3"),
        ("/v1/models/nope:predict", {"instances": [PIX]}, 404, "Servable not found"),
        ("/v1/models/fake/versions/2:predict", {"instances": [PIX]}, 404, "not loaded"),
        ("/v1/models/fake/versions/0:predict", {"instances": [PIX]}, 404, "positive integer"),
        ("/v1/models/fake/versions/abc:predict", {"instances": [PIX]}, 404, "positive integer"),
        ("/v1/models/fake:classify", {"instances": [PIX]}, 404, "predict"),
    ],
)
async def test_tf_serving_errors(client: httpx.AsyncClient, path: str, body: object, status: int, words: str) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = await client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"].lower()


async def test_tf_serving_status_errors(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models/nope")).status_code == 404
    assert (await client.get("/v1/models/fake/versions/x")).status_code == 404
    assert (await client.get("/v1/models/fake/versions/1/metadata")).status_code == 200


def infer_body(**inp: object) -> dict[str, object]:
    base = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [B64]}
    return {"inputs": [{**base, **inp}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v2/models/fake/infer", infer_body(datatype="FP32"), 400, "datatype"),
        ("/v2/models/fake/infer", infer_body(datatype="UINT8", shape=[1, 8, 8, 3], data=[0] * 192), 400, "shape"),
        ("/v2/models/fake/infer", infer_body(datatype="UINT8", shape=[1, 16, 16, 3], data=[0] * 5), 400, "integers"),
        ("/v2/models/fake/infer", infer_body(datatype="UINT8", shape=[1, 16, 16, 3], data=[999] * 768), 400, "255"),
        ("/v2/models/fake/infer", infer_body(data=["%%%"]), 400, "base64"),
        ("/v2/models/fake/infer", infer_body(data=[1]), 400, "base64 string"),
        ("/v2/models/fake/infer", infer_body(shape=[2]), 400, "2 elements"),
        ("/v2/models/fake/infer", infer_body(shape="x"), 400, "shape"),
        ("/v2/models/fake/infer", infer_body(shape=[4], data=[B64] * 4), 413, "limit is 3"),
        ("/v2/models/fake/infer", {"inputs": []}, 400, "exactly one"),
        ("/v2/models/fake/infer", {"inputs": "x"}, 400, "exactly one"),
        ("/v2/models/fake/infer", [1], 400, "object"),
        ("/v2/models/fake/infer", {**infer_body(), "outputs": [{"name": "logits"}]}, 400, "unknown output"),
        ("/v2/models/fake/infer", {**infer_body(), "outputs": [{"name": "probabilities",
                                                               "parameters": {"classification": -1}}]}, 400,
         "classification"),
        ("/v2/models/fake/infer", infer_body(data=None, parameters={"binary_data_size": 99}), 400, "binary"),
        ("/v2/models/nope/infer", infer_body(), 404, "not served"),
        ("/v2/models/fake/versions/7/infer", infer_body(), 404, "not loaded"),
        ("/v2/models/fake/versions/-1/infer", infer_body(), 404, "positive integer"),
    ],
)
async def test_kserve_errors(client: httpx.AsyncClient, path: str, body: object, status: int, words: str) -> None:
    r = await client.post(path, content=orjson.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"].lower()


async def test_kserve_binary_header_errors(client: httpx.AsyncClient) -> None:
    head = orjson.dumps(infer_body(data=None, parameters={"binary_data_size": 10}))
    for value in ("abc", "0", str(len(head) + 100)):
        r = await client.post("/v2/models/fake/infer", content=head + b"x" * 10,
                              headers={"Inference-Header-Content-Length": value})
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    bad_elements = struct.pack("<I", 50) + b"short"
    head = orjson.dumps(infer_body(data=None, parameters={"binary_data_size": len(bad_elements)}))
    r = await client.post("/v2/models/fake/infer", content=head + bad_elements,
                          headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "ends inside" in r.json()["error"]


async def test_kserve_classification_json(client: httpx.AsyncClient) -> None:
    body = {**infer_body(), "id": "x1", "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    r = await client.post("/v2/models/fake/infer", json=body)
    out = r.json()
    assert out["id"] == "x1" and out["model_version"] == "1"
    assert out["outputs"][0]["datatype"] == "BYTES" and out["outputs"][0]["shape"] == [1, 2]
    assert out["outputs"][0]["data"][0] == "0.900000:2:bright"


async def test_repository_extension_needs_admin_key(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v2/repository/index")).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.post("/v2/repository/models/fake/unload", headers=wrong)).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    index = (await client.post("/v2/repository/index", headers=auth)).json()
    assert index == [{"name": "fake", "version": "1", "state": "READY", "role": "stable"}]
    assert (await client.post("/v2/repository/models/fake/unload", headers={"X-API-Key": "s3cret"})).status_code == 200
    assert (await client.get("/v2/models/fake/ready")).status_code == 503  # nothing served now
    # polling must not bring an unloaded model back: two full scans later it is still unloaded
    scans = metric_sum((await client.get("/metrics")).text, "imgserve_store_scans_total")
    await eventually_async(lambda: client.get("/metrics"),
                           lambda r: metric_sum(r.text, "imgserve_store_scans_total") >= scans + 2)
    assert (await client.get("/v2/models/fake/ready")).status_code == 503
    assert (await client.post("/v2/repository/index", headers=auth)).json()[0]["state"] == "UNAVAILABLE"
    r = await client.post("/v2/repository/models/fake/load", headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "READY"
    assert (await client.get("/v2/models/fake/ready")).status_code == 200
    assert (await client.post("/v2/repository/models/nope/load", headers=auth)).status_code == 404
    assert (await client.post("/v2/repository/models/..%2Fx/load", headers=auth)).status_code == 404


async def test_documented_examples_work_when_tried(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    tfs = spec["paths"]["/v1/models/{target}"]["post"]["requestBody"]["content"]["application/json"]["example"]
    r = await client.post("/v1/models/fake:predict", json=tfs)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    ks = spec["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]["application/json"]["example"]
    r = await client.post("/v2/models/fake/infer", json=ks)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 3]


async def test_protocol_bodies_are_documented_from_their_models(client: httpx.AsyncClient) -> None:
    """The OpenAPI document takes the KServe and TF Serving bodies from the pydantic models, and what the
    server answers validates against the response models."""
    from service.api.kserve import InferenceResponse, ModelMetadata
    from service.api.tfserving import PredictResponse

    doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    assert {"InferenceRequest", "RequestInput", "PredictRequest", "InferenceResponse"} <= set(schemas)
    assert schemas["RequestInput"]["properties"]["shape"]["items"]["minimum"] == 0
    body = doc["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/InferenceRequest"}
    r = await client.post("/v2/models/fake/infer", json=infer_body())
    InferenceResponse.model_validate(r.json())
    assert r.headers["x-model-runtime"] == "fake/fp32"
    meta = ModelMetadata.model_validate((await client.get("/v2/models/fake")).json())
    assert meta.parameters["runtime"] == "fake" and meta.platform == "fake"
    r = await client.post("/v1/models/fake:predict", json={"instances": [PIX]})
    assert PredictResponse.model_validate(r.json()).predictions is not None
