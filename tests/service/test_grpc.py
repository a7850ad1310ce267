"""gRPC in process: the app's lifespan starts the gRPC server on a loopback port beside the (ASGI) HTTP
app, with FakeClassifier as the runtime. Every method of the KServe v2 / Triton and TF Serving services
this server offers, their answers against the REST ones, and every status code of the mapping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.harness import free_port
from service.rpc import protos
from tests.support import (
    LABELS,
    REPO,
    FakeClassifier,
    app_client,
    eventually,
    eventually_async,
    grpc_infer,
    jpeg,
    metric_sum,
    write_fake_version,
)

KS, PS, MS = protos.KSERVE, protos.PREDICTION, protos.MODEL_SERVICE
OK = grpc.StatusCode.OK


def m(type_name: str, /, **fields: Any) -> Any:
    return protos.message(type_name)(**fields)


@dataclass
class Grpc:
    http: httpx.AsyncClient
    channel: grpc.aio.Channel
    app: Any

    async def call(self, service: str, method: str, request: Any, *, raw: bool = False, timeout: float | None = 30,
                   **metadata: str) -> tuple[grpc.StatusCode, Any, dict[str, str]]:
        """(code, response or details, trailing metadata) of one call."""
        _, resp_cls, *_ = protos.methods(service)[method]
        fn = self.channel.unary_unary(f"/{service}/{method}", request_serializer=None if raw else
                                      (lambda x: x.SerializeToString()), response_deserializer=resp_cls.FromString)
        call = fn(request, timeout=timeout, metadata=tuple(metadata.items()) or None)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())
        return OK, response, dict(await call.trailing_metadata() or ())


@pytest.fixture
async def rpc(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Grpc]:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    write_fake_version(tmp_path, "fake", 2, LABELS)
    settings: dict[str, Any] = {"max_batch_delay_ms": 2, "max_images_per_request": 4, "admin_api_key": "adm1n",
                                "version_policy": "all", "max_upload_bytes": 200_000,
                                **getattr(request, "param", {})}
    port = free_port()
    async with app_client(tmp_path, grpc_port=port, **settings) as http:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Grpc(http, channel, http.app)  # type: ignore[attr-defined]


def infer_request(images: list[bytes] | None = None, *, raw: bool = True, k: int = 0, **fields: Any) -> Any:
    req = m("inference.ModelInferRequest", model_name="fake", **fields)
    if images is not None:
        spec = req.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
        if raw:
            req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in images))
        else:
            spec.contents.bytes_contents.extend(images)
    if k:
        req.outputs.add(name="probabilities").parameters["classification"].int64_param = k
    return req


def probabilities(resp: Any) -> np.ndarray:
    out = resp.outputs[0]
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(out.shape))


IMAGES = [jpeg(10), jpeg(120), jpeg(250)]


async def test_server_and_model_metadata(rpc: Grpc) -> None:
    assert (await rpc.call(KS, "ServerLive", m("inference.ServerLiveRequest")))[1].live
    assert (await rpc.call(KS, "ServerReady", m("inference.ServerReadyRequest")))[1].ready
    code, meta, _ = await rpc.call(KS, "ServerMetadata", m("inference.ServerMetadataRequest"))
    assert code == OK and meta.name == "imgserve" and "classification" in meta.extensions
    ready = [(await rpc.call(KS, "ModelReady", m("inference.ModelReadyRequest", name=n, version=v)))[1].ready
             for n, v in [("fake", ""), ("fake", "1"), ("fake", "3"), ("nope", "")]]
    assert ready == [True, True, False, False]
    code, meta, _ = await rpc.call(KS, "ModelMetadata", m("inference.ModelMetadataRequest", name="fake"))
    assert code == OK and list(meta.versions) == ["1", "2"] and meta.platform == "fake"
    assert list(meta.inputs[0].shape) == [-1, 16, 16, 3] and list(meta.outputs[0].shape) == [-1, 3]
    code, cfg, _ = await rpc.call(KS, "ModelConfig", m("inference.ModelConfigRequest", name="fake"))
    assert code == OK and cfg.config.name == "fake" and list(cfg.config.input[0].dims) == [16, 16, 3]
    assert cfg.config.parameters["labels"].string_value == ",".join(LABELS)


async def test_model_infer_answers_as_rest_does_in_every_input_form(rpc: Grpc) -> None:
    rest = await rpc.http.post("/v2/models/fake/infer", json={"inputs": [
        {"name": "images", "shape": [3], "datatype": "BYTES",
         "data": [__import__("base64").b64encode(b).decode() for b in IMAGES]}]})
    expected = np.asarray(rest.json()["outputs"][0]["data"], np.float32).reshape(3, 3)
    assert expected.argmax(1).tolist() == [0, 1, 2]
    for raw in (True, False):
        code, resp, trailers = await rpc.call(KS, "ModelInfer", infer_request(IMAGES, raw=raw, id="r-1"))
        assert code == OK, resp
        assert resp.id == "r-1" and resp.model_name == "fake" and resp.model_version == "2"
        np.testing.assert_array_equal(probabilities(resp), expected)
        assert trailers["x-model-version"] == "2" and trailers["x-model-role"] == "stable"
        assert "inference;dur=" in trailers["server-timing"] and trailers["x-request-id"]
    pixels = np.stack([np.full((16, 16, 3), r, np.uint8) for r in (10, 120, 250)])
    for raw in (True, False):
        req = m("inference.ModelInferRequest", model_name="fake", model_version="1")
        spec = req.inputs.add(name="images", datatype="UINT8", shape=[3, 16, 16, 3])
        if raw:
            req.raw_input_contents.append(pixels.tobytes())
        else:
            spec.contents.uint_contents.extend(pixels.ravel().tolist())
        code, resp, _ = await rpc.call(KS, "ModelInfer", req)
        assert code == OK and resp.model_version == "1"
        assert probabilities(resp).argmax(1).tolist() == [0, 1, 2]


async def test_classification_top_k_and_labels(rpc: Grpc) -> None:
    code, resp, _ = await rpc.call(KS, "ModelInfer", infer_request([jpeg(250)], k=2))
    assert code == OK and resp.outputs[0].datatype == "BYTES" and list(resp.outputs[0].shape) == [1, 2]
    raw, items = resp.raw_output_contents[0], []
    while raw:
        (n,) = struct.unpack_from("<I", raw)
        items.append(raw[4:4 + n].decode())
        raw = raw[4 + n:]
    assert items[0] == "0.900000:2:bright" and items[1].split(":")[2] in LABELS
    rest = (await rpc.http.post("/v1/models/fake/rollout/label", json={"version": 1, "label": "old"},
                                headers={"X-API-Key": "adm1n"}))
    assert rest.status_code == 200, rest.text
    req = infer_request([jpeg(250)])
    req.parameters["label"].string_param = "old"
    code, resp, trailers = await rpc.call(KS, "ModelInfer", req)
    assert code == OK and resp.model_version == "1" and trailers["x-model-version"] == "1"


def one_input(datatype: str, shape: list[int], raw: bytes | None) -> Any:
    req = m("inference.ModelInferRequest", model_name="fake")
    req.inputs.add(name="images", datatype=datatype, shape=shape)
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


BAD = [
    (infer_request(None), "exactly one input"),
    (infer_request([b"not an image at all"]), "image"),
    (one_input("FP32", [1], b"\0" * 4), "datatype"),
    (one_input("BYTES", [3], struct.pack("<I", 2) + b"ab"), "shape says 3"),
    (one_input("BYTES", [1], struct.pack("<I", 9) + b"ab"), "ends inside an element"),
    (one_input("UINT8", [1, 16, 16, 3], b"\0" * 10), "do not match"),
    (one_input("UINT8", [1, 8, 8, 3], b"\0" * 192), "shape [N, 16, 16, 3]"),
    (one_input("BYTES", [1], None), "no data"),
    (infer_request([jpeg(1)] * 5), "limit is 4"),
    (infer_request([jpeg(1)], k=-1), "non-negative"),
]


@pytest.mark.parametrize(("request_", "words"), BAD, ids=[w for _, w in BAD])
async def test_bad_input_is_invalid_argument_for_that_call_alone(rpc: Grpc, request_: Any, words: str) -> None:
    code, details, _ = await rpc.call(KS, "ModelInfer", request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (code, details)
    code, resp, _ = await rpc.call(KS, "ModelInfer", infer_request([jpeg(250)]))  # the next call is answered
    assert code == OK and probabilities(resp).argmax() == 2


async def test_unknown_parameters_outputs_and_malformed_messages(rpc: Grpc) -> None:
    req = infer_request([jpeg(1)])
    req.parameters["shared_memory_region"].string_param = "x"
    code, details, _ = await rpc.call(KS, "ModelInfer", req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shared memory is not supported" in details
    req = infer_request([jpeg(1)])
    req.outputs.add(name="logits")
    code, details, _ = await rpc.call(KS, "ModelInfer", req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 'logits'" in details
    code, details, _ = await rpc.call(KS, "ModelInfer", b"\x0a\xff\xff\xff", raw=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid ModelInferRequest" in details


async def test_not_found_codes(rpc: Grpc) -> None:
    for req, words in [(infer_request([jpeg(1)], model_version="9"), "version 9"),
                       (infer_request([jpeg(1)], model_version="x"), "not a positive integer"),
                       (m("inference.ModelInferRequest", model_name="nope"), "nope")]:
        code, details, _ = await rpc.call(KS, "ModelInfer", req)
        assert code == grpc.StatusCode.NOT_FOUND and words in details, (code, details)


@pytest.mark.parametrize("rpc", [{"max_queue_rows": 2}], indirect=True)
async def test_a_full_queue_and_a_message_over_the_limit_are_resource_exhausted(rpc: Grpc) -> None:
    code, details, _ = await rpc.call(KS, "ModelInfer", infer_request([jpeg(1)] * 3))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in details
    code, details, _ = await rpc.call(KS, "ModelInfer", infer_request([b"x" * 300_000]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    text = (await rpc.http.get("/metrics")).text
    assert metric_sum(text, "imgserve_grpc_requests_total", method="ModelInfer", code="RESOURCE_EXHAUSTED") == 1
    assert metric_sum(text, "imgserve_rejections_total", reason="queue_full") == 1


async def test_deadlines(rpc: Grpc) -> None:
    code, details, _ = await rpc.call(KS, "ModelInfer", infer_request([jpeg(1)]), **{"x-request-timeout-ms": "soon"})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "x-request-timeout-ms" in details
    # a deadline shorter than decoding four large images: the server says so (not the client's own timer)
    big = [jpeg(200, size=1500)] * 4
    code, details, _ = await rpc.call(KS, "ModelInfer", infer_request(big), **{"x-request-timeout-ms": "1"})
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in details, (code, details)
    req = infer_request(big)
    req.parameters["timeout"].int64_param = 1  # Triton's own request parameter, in microseconds
    code, details, _ = await rpc.call(KS, "ModelInfer", req, timeout=None)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in details, (code, details)


@pytest.mark.parametrize("rpc", [{"api_key": "k3y"}], indirect=True)
async def test_api_keys_come_in_metadata(rpc: Grpc) -> None:
    code, details, _ = await rpc.call(KS, "ModelInfer", infer_request([jpeg(1)]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "x-api-key" in details
    assert (await rpc.call(KS, "ModelInfer", infer_request([jpeg(1)]), authorization="Bearer k3y"))[0] == OK
    assert (await rpc.call(KS, "ModelInfer", infer_request([jpeg(1)]), **{"x-api-key": "k3y"}))[0] == OK
    assert (await rpc.call(KS, "ModelInfer", infer_request([jpeg(1)]), **{"x-api-key": "adm1n"}))[0] != OK
    index = m("inference.RepositoryIndexRequest")
    assert (await rpc.call(KS, "RepositoryIndex", index, **{"x-api-key": "k3y"}))[0] == grpc.StatusCode.UNAUTHENTICATED
    code, resp, _ = await rpc.call(KS, "RepositoryIndex", index, **{"x-api-key": "adm1n"})
    assert code == OK and {(x.name, x.version, x.state) for x in resp.models} == {("fake", "1", "READY"),
                                                                                   ("fake", "2", "READY")}
    code, _, _ = await rpc.call(KS, "RepositoryModelUnload", m("inference.RepositoryModelUnloadRequest",
                                                               model_name="fake"), **{"x-api-key": "adm1n"})
    assert code == OK
    assert not (await rpc.call(KS, "ModelReady", m("inference.ModelReadyRequest", name="fake")))[1].ready
    code, _, _ = await rpc.call(KS, "RepositoryModelLoad", m("inference.RepositoryModelLoadRequest",
                                                             model_name="fake"), **{"x-api-key": "adm1n"})
    assert code == OK and (await rpc.call(KS, "ModelReady", m("inference.ModelReadyRequest", name="fake")))[1].ready


def stream_infer(channel: grpc.aio.Channel) -> Any:
    """ModelStreamInfer on `channel`: call it with an iterable of requests for a stream of responses."""
    return channel.stream_stream(f"/{KS}/ModelStreamInfer", request_serializer=lambda x: x.SerializeToString(),
                                 response_deserializer=protos.message("inference.ModelStreamInferResponse").FromString)


async def test_stream_infer_answers_each_request_and_goes_on_after_a_bad_one(rpc: Grpc) -> None:
    stream = stream_infer(rpc.channel)
    reqs = [infer_request([jpeg(250)], id="a"), infer_request([b"junk"], id="b"), infer_request([jpeg(10)], id="c")]
    got = {r.infer_response.id: r async for r in stream(iter(reqs), timeout=30)}
    assert set(got) == {"a", "b", "c"}
    assert got["b"].error_message and not got["a"].error_message and not got["c"].error_message
    assert probabilities(got["a"].infer_response).argmax() == 2 and probabilities(got["c"].infer_response).argmax() == 0


@contextlib.asynccontextmanager
async def held_model(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Any, grpc.aio.Channel, threading.Event]]:
    """A server (HTTP client, gRPC channel) whose model waits at each call while `gate` is clear, so that
    requests can be held in progress; the gate is open for the warm-up. Nothing runs inline."""
    write_fake_version(tmp_path, "fake", 1, LABELS)
    gate = threading.Event()
    gate.set()

    class Held(FakeClassifier):
        def predict(self, images: np.ndarray) -> np.ndarray:
            gate.wait(30)
            return super().predict(images)

    port = free_port()
    async with app_client(tmp_path, loader=lambda p, meta: Held(meta), grpc_port=port, max_batch_delay_ms=2,
                          inline_run_max_ms=0, **settings) as http:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield http, channel, gate


async def test_each_request_of_a_stream_is_a_request_in_progress(tmp_path: Path) -> None:
    """While a stream's requests wait for the model they count as requests in progress, as unary calls do:
    in the in-flight gauge, and for the inline rule (a lone row runs on the event loop only while nothing
    else is being worked on; uncounted, every request of every stream ran inline, one at a time)."""
    async with held_model(tmp_path) as (http, channel, gate):
        state = http.app.state  # type: ignore[attr-defined]
        stream = stream_infer(channel)
        gate.clear()
        reqs = [infer_request([jpeg(red)], id=str(red)) for red in (10, 120, 250)]
        answers = asyncio.ensure_future(_collect(stream(iter(reqs), timeout=30)))
        served = state.registry.resolve("fake", None)
        try:
            await eventually(lambda: served.batcher.depth + served.batcher.running_rows == 3, what="3 rows queued")
            in_progress = state.metrics.requests_in_progress
            gauge = metric_sum((await http.get("/metrics")).text, "imgserve_inflight_requests")
        finally:
            gate.set()
        got = await answers
    assert in_progress == 3
    assert gauge == 3
    assert sorted(r.infer_response.id for r in got) == ["10", "120", "250"]
    assert all(not r.error_message for r in got)
    assert state.metrics.requests_in_progress == 0


async def test_the_inflight_limit_counts_every_protocol_and_refuses_grpc_calls_over_it(tmp_path: Path) -> None:
    """IMGSERVE_MAX_INFLIGHT_REQUESTS bounds the requests a process works on, whatever their protocol: with two
    gRPC calls held at the model, a third call is RESOURCE_EXHAUSTED, a stream's request gets the same message,
    and an HTTP POST is 429; calls that only read (ServerLive) are not limited; the held calls then answer."""
    async with held_model(tmp_path, max_inflight_requests=2) as (http, channel, gate):
        state = http.app.state  # type: ignore[attr-defined]
        served = state.registry.resolve("fake", None)
        rpc = Grpc(http, channel, state)
        gate.clear()
        try:
            held = [asyncio.ensure_future(rpc.call(KS, "ModelInfer", infer_request([jpeg(v)]))) for v in (10, 250)]
            await eventually(lambda: served.batcher.depth + served.batcher.running_rows == 2, what="2 rows held")
            code, details, _ = await rpc.call(KS, "ModelInfer", infer_request([jpeg(120)]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at capacity (2 requests" in details
            streamed = [r async for r in stream_infer(channel)(iter([infer_request([jpeg(5)], id="s")]),
                                                                timeout=30)]
            assert [r.infer_response.id for r in streamed] == ["s"] and "at capacity" in streamed[0].error_message
            refused = await http.post("/predict", content=jpeg(30), headers={"Content-Type": "image/jpeg"})
            assert refused.status_code == 429 and refused.json()["code"] == "queue_full"
            assert (await rpc.call(KS, "ServerLive", m("inference.ServerLiveRequest")))[1].live
        finally:
            gate.set()
        answers = await asyncio.gather(*held)
        assert [a[0] for a in answers] == [OK, OK]
        text = (await http.get("/metrics")).text
    assert metric_sum(text, "imgserve_rejections_total", reason="busy") == 3
    assert metric_sum(text, "imgserve_grpc_requests_total", method="ModelInfer", code="RESOURCE_EXHAUSTED") == 1
    assert metric_sum(text, "imgserve_inflight_requests") == 0


async def test_request_ids_of_calls_and_of_each_stream_request(tmp_path: Path) -> None:
    """A call's x-request-id is the caller's (cut to 128 characters, as over HTTP) or a new one, and the request
    log records the answer under it, so feedback can name it; a stream's n-th request is `<stream id>/<n>`."""
    write_fake_version(tmp_path, "fake", 1, LABELS)
    log = tmp_path / "requests.log"
    port = free_port()
    async with app_client(tmp_path, grpc_port=port, max_batch_delay_ms=2, request_log=str(log)):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            rpc = Grpc(None, channel, None)  # type: ignore[arg-type]
            ids = []
            for given in ({}, {}, {"x-request-id": "caller-" + "x" * 200}):
                code, _, trailers = await rpc.call(KS, "ModelInfer", infer_request([jpeg(120)]), **given)
                assert code == OK
                ids.append(trailers["x-request-id"])
            stream = stream_infer(channel)(iter([infer_request([jpeg(r)], id=str(r)) for r in (10, 120, 250)]),
                                           timeout=30, metadata=(("x-request-id", "s-1"),))
            assert len([r async for r in stream if not r.error_message]) == 3

            def logged() -> dict[str, Any]:
                lines = log.read_text().splitlines() if log.exists() else []
                return {d["request_id"]: d for d in map(json.loads, lines)}

            seen = await eventually(lambda: len(logged()) == 6 and logged(), what="six lines in the request log")
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids[:2]) and ids[0] != ids[1]
    assert ids[2] == ("caller-" + "x" * 200)[:128]
    assert set(seen) == {*ids, "s-1/1", "s-1/2", "s-1/3"}
    assert {d["protocol"] for d in seen.values()} == {"grpc"}


async def _collect(call: Any) -> list[Any]:
    return [r async for r in call]


def tensor(dtype: int, shape: list[int], **fields: Any) -> Any:
    t = m("tensorflow.TensorProto", dtype=dtype, **fields)
    t.tensor_shape.dim.extend(m("tensorflow.TensorShapeProto.Dim", size=n) for n in shape)
    return t


def predict_request(name: str = "fake", **spec: Any) -> Any:
    return m("tensorflow.serving.PredictRequest", model_spec=m("tensorflow.serving.ModelSpec", name=name, **spec))


async def test_tf_serving_predict_classify_metadata_and_status(rpc: Grpc) -> None:
    rest = (await rpc.http.post("/v1/models/fake:predict", json={"instances": [
        {"b64": __import__("base64").b64encode(b).decode()} for b in IMAGES]})).json()["predictions"]
    req = predict_request()
    req.inputs["images"].CopyFrom(tensor(7, [3], string_val=IMAGES))
    code, resp, _ = await rpc.call(PS, "Predict", req)
    assert code == OK, resp
    out = resp.outputs["probabilities"]
    got = np.frombuffer(out.tensor_content, "<f4").reshape([d.size for d in out.tensor_shape.dim])
    np.testing.assert_array_equal(got, np.asarray(rest, np.float32))
    assert resp.model_spec.version.value == 2 and resp.model_spec.signature_name == "serving_default"
    pixels = np.full((1, 16, 16, 3), 250, np.uint8)
    req = predict_request(version=m("google.protobuf.Int64Value", value=1))
    req.inputs["images"].CopyFrom(tensor(4, [1, 16, 16, 3], tensor_content=pixels.tobytes()))
    code, resp, _ = await rpc.call(PS, "Predict", req)
    assert code == OK and resp.model_spec.version.value == 1
    ex = m("tensorflow.Example")
    ex.features.feature["image/encoded"].bytes_list.value.append(jpeg(10))
    creq = m("tensorflow.serving.ClassificationRequest", model_spec=m("tensorflow.serving.ModelSpec", name="fake"))
    creq.input.example_list.examples.append(ex)
    code, resp, _ = await rpc.call(PS, "Classify", creq)
    assert code == OK and [c.label for c in resp.result.classifications[0].classes][0] == "dark"
    code, resp, _ = await rpc.call(PS, "GetModelMetadata", m(
        "tensorflow.serving.GetModelMetadataRequest", model_spec=m("tensorflow.serving.ModelSpec", name="fake"),
        metadata_field=["signature_def"]))
    assert code == OK
    sigs = protos.message("tensorflow.serving.SignatureDefMap")()
    assert resp.metadata["signature_def"].Unpack(sigs)
    assert [d.size for d in sigs.signature_def["serving_default"].inputs["images"].tensor_shape.dim] == [-1, 16, 16, 3]
    code, resp, _ = await rpc.call(MS, "GetModelStatus", m(
        "tensorflow.serving.GetModelStatusRequest", model_spec=m("tensorflow.serving.ModelSpec", name="fake")))
    assert code == OK and {(s.version, s.state) for s in resp.model_version_status} == {(1, 30), (2, 30)}


async def test_tf_serving_errors(rpc: Grpc) -> None:
    req = predict_request("nope")
    req.inputs["images"].CopyFrom(tensor(7, [1], string_val=[jpeg(1)]))
    code, details, _ = await rpc.call(PS, "Predict", req)
    assert code == grpc.StatusCode.NOT_FOUND and "Servable not found" in details
    for fix, words in [({"inputs": "pixels"}, "takes one input"), ({"dtype": 1}, "dtype"),
                       ({"signature_name": "other"}, "unknown signature"), ({"string_val": [b"junk"]}, "image")]:
        req = predict_request(signature_name=fix.get("signature_name", ""))
        req.inputs[fix.get("inputs", "images")].CopyFrom(tensor(fix.get("dtype", 7), [1],
                                                                string_val=fix.get("string_val", [jpeg(1)])))
        code, details, _ = await rpc.call(PS, "Predict", req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (fix, code, details)
    code, details, _ = await rpc.call(PS, "GetModelMetadata", m(
        "tensorflow.serving.GetModelMetadataRequest", model_spec=m("tensorflow.serving.ModelSpec", name="fake"),
        metadata_field=["something"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature_def" in details


async def test_health_follows_readiness_and_draining_refuses_new_calls(rpc: Grpc) -> None:
    stub = health_pb2_grpc.HealthStub(rpc.channel)

    async def status(want: int) -> bool:
        got = [(await stub.Check(health_pb2.HealthCheckRequest(service=s))).status for s in ("", KS, PS, MS)]
        return got == [want] * 4

    await eventually_async(lambda: status(health_pb2.HealthCheckResponse.SERVING), bool, 10,
                           "health SERVING when ready")
    rpc.app.state.draining = True  # what SIGTERM does first (service/__main__.py)
    await eventually_async(lambda: status(health_pb2.HealthCheckResponse.NOT_SERVING), bool, 10,
                           "health NOT_SERVING while draining")
    code, details, _ = await rpc.call(KS, "ModelInfer", infer_request([jpeg(1)]))
    assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details


class Gate(FakeClassifier):
    """Once armed (after the warm-up), holds every batch until `release` is set."""

    armed, release = threading.Event(), threading.Event()

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.armed.is_set():
            assert self.release.wait(60)
        return super().predict(images)


async def test_a_cancelled_call_is_counted_and_nothing_else_is_affected(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "fake", 1, LABELS)
    port = free_port()
    Gate.armed.clear()
    Gate.release.clear()
    async with app_client(tmp_path, grpc_port=port, loader=lambda p, meta: Gate(meta), max_batch_delay_ms=1) as http:
        Gate.armed.set()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            fn = channel.unary_unary(f"/{KS}/ModelInfer", request_serializer=lambda x: x.SerializeToString(),
                                     response_deserializer=protos.message("inference.ModelInferResponse").FromString)
            call = fn(infer_request([jpeg(1), jpeg(1)]), timeout=60)  # two rows: queued (one may run inline)

            async def metric(name: str, **labels: str) -> float:
                return metric_sum((await http.get("/metrics")).text, name, **labels)

            await eventually_async(lambda: metric("imgserve_inflight_rows"), lambda n: n == 2, 30,
                                   "the call's rows in flight")
            assert await metric("imgserve_inflight_requests") == 1  # gRPC calls count as HTTP POSTs do
            call.cancel()
            await eventually_async(lambda: metric("imgserve_grpc_requests_total", code="CANCELLED"),
                                   lambda n: n == 1, 30, "the cancelled call counted")
            Gate.armed.clear()
            Gate.release.set()
            resp = await fn(infer_request([jpeg(250)]), timeout=60)
            assert probabilities(resp).argmax() == 2
            assert (await http.get("/health/ready")).status_code == 200
            assert await metric("imgserve_rejections_total", reason="client_gone") == 1
            assert await metric("imgserve_inflight_requests") == 0


async def test_health_is_not_serving_until_a_model_is_loaded(tmp_path: Path) -> None:
    port = free_port()
    async with app_client(tmp_path, grpc_port=port, ready=False):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                return int((await stub.Check(health_pb2.HealthCheckRequest(service=KS))).status)

            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            write_fake_version(tmp_path, "fake", 1, LABELS)  # the next store poll loads it
            await eventually_async(status, lambda s: s == health_pb2.HealthCheckResponse.SERVING, 30,
                                   "health SERVING once the model is loaded")


@pytest.fixture(scope="module")
def background_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app with gRPC on a loop of its own thread, for synchronous clients (hypothesis drives them)."""
    store = tmp_path_factory.mktemp("store")
    write_fake_version(store, "fake", 1, LABELS)
    port, started, stop = free_port(), threading.Event(), threading.Event()

    async def serve() -> None:
        async with app_client(store, grpc_port=port, max_images_per_request=4, max_upload_bytes=100_000):
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.01)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert started.wait(60)
    yield f"127.0.0.1:{port}"
    stop.set()
    thread.join(60)


SAFE_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
TENSORS = st.builds(
    lambda datatype, shape, raw, typed: (datatype, shape, raw, typed),
    st.sampled_from(["BYTES", "UINT8", "FP32", "INT64", "", "bytes"]),
    st.lists(st.integers(0, 20), max_size=5),
    st.one_of(st.none(), st.binary(max_size=400), st.just(jpeg(200))),
    st.lists(st.binary(max_size=50), max_size=3),
)


@given(body=st.binary(max_size=300))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_as_a_message_never_fail_the_server(background_server: str, body: bytes) -> None:
    with grpc.insecure_channel(background_server) as channel:
        fn = channel.unary_unary(f"/{KS}/ModelInfer")
        try:
            fn(body, timeout=30)
            code = OK
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
    assert code in SAFE_CODES


@given(tensors=st.lists(TENSORS, max_size=2), version=st.sampled_from(["", "1", "2", "x", "-1"]),
       params=st.dictionaries(st.sampled_from(["label", "timeout", "other", "priority"]), st.integers(-5, 5),
                              max_size=2), k=st.integers(-2, 5))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_requests_get_an_answer_or_a_client_error(background_server: str, tensors: list[Any],
                                                           version: str, params: dict[str, int], k: int) -> None:
    req = m("inference.ModelInferRequest", model_name="fake", model_version=version)
    for datatype, shape, raw, typed in tensors:
        spec = req.inputs.add(name="images", datatype=datatype, shape=shape)
        if raw is not None:
            req.raw_input_contents.append(raw if raw[:2] != b"\xff\xd8" else struct.pack("<I", len(raw)) + raw)
        else:
            spec.contents.bytes_contents.extend(typed)
    for key, value in params.items():
        req.parameters[key].int64_param = value
    req.outputs.add(name="probabilities").parameters["classification"].int64_param = k
    with grpc.insecure_channel(background_server) as channel:
        fn = channel.unary_unary(f"/{KS}/ModelInfer", request_serializer=lambda x: x.SerializeToString())
        try:
            fn(req, timeout=30)
            code = OK
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
    assert code in SAFE_CODES, code


def test_the_server_still_answers_after_the_fuzzing(background_server: str) -> None:
    probs, trailers = grpc_infer(background_server, "fake", [jpeg(250)])
    assert probs.argmax() == 2 and trailers["x-model-version"] == "1"


def test_the_grpc_side_imports_neither_tensorflow_nor_the_http_stack() -> None:
    code = ("import sys, service.rpc.server, service.rpc.kserve, service.rpc.tfserving, service.pipeline; "
            "print(sorted(m for m in ('tensorflow', 'fastapi', 'starlette', 'tritonclient', 'tensorflow_serving') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
