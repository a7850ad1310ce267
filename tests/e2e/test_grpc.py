"""gRPC end to end, with the real clients unchanged: `tritonclient.grpc` (in an environment of its own: it
pins protobuf<7) and TF Serving's published stubs (`tensorflow-serving-api`), against a real server on
127.0.0.1 serving the model `train` made; answers equal to the REST ones; two processes on one port;
health and calls while draining."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from tests.support import (
    CLOTHING,
    REPO,
    LiveServer,
    Trained,
    grpc_health,
    grpc_infer,
    metric_sum,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.slow
KEY = "k3y"
AUTH = {"authorization": f"Bearer {KEY}"}
CLIENT_REQUIREMENTS = REPO / "tests" / "clients" / "tritonclient-grpc.txt"
CLIENT_VENV = REPO / ".venv-clients" / "tritonclient-grpc"


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """Python of an environment with tritonclient[grpc] as pinned in tests/clients (made once, kept)."""
    python, stamp = CLIENT_VENV / "bin" / "python", CLIENT_VENV / "requirements.txt"
    if not (python.exists() and stamp.exists() and stamp.read_text() == CLIENT_REQUIREMENTS.read_text()):
        shutil.rmtree(CLIENT_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(CLIENT_VENV)], check=True, timeout=300)
        uv = Path(sys.executable).parent / "uv"  # installed by `make install`, as the project's own lock is
        r = subprocess.run([str(uv), "pip", "install", "--quiet", "--python", str(python), "-r",
                            str(CLIENT_REQUIREMENTS)], capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        shutil.copy(CLIENT_REQUIREMENTS, stamp)
    return python


@pytest.fixture(scope="module")
def server(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("grpc")
    shutil.copytree(trained.store, tmp / "store")
    s = start_server(tmp / "store", tmp, IMGSERVE_API_KEY=KEY)
    yield s
    assert s.stop() == 0


def rest_kserve(server: LiveServer, images: list[bytes]) -> np.ndarray:
    r = httpx.post(server.url + "/v2/models/clothing/infer", headers=AUTH, timeout=60, json={"inputs": [
        {"name": "images", "shape": [len(images)], "datatype": "BYTES",
         "data": [base64.b64encode(b).decode() for b in images]}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_tritonclient_grpc_unchanged(server: LiveServer, trained: Trained, triton_python: Path) -> None:
    paths = trained.test_paths[:3]
    r = subprocess.run([str(triton_python), str(REPO / "tests" / "clients" / "triton_grpc.py"), server.grpc_target,
                        "clothing", KEY, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"] and not seen["unknown_ready"]
    assert seen["metadata"]["inputs"][0]["shape"] == ["-1", str(trained.height), str(trained.width), "3"]
    expected = rest_kserve(server, [p.read_bytes() for p in paths])
    np.testing.assert_allclose(seen["probabilities"], expected, atol=1e-5)
    assert seen["response"]["id"] == "t-1" and seen["response"]["model_version"] == str(trained.version)
    for row, probs in zip(seen["top2"], expected, strict=True):
        score, index, label = row[0].split(":")
        assert int(index) == probs.argmax() and label == trained.labels[int(index)]
    assert np.asarray(seen["pixels"]).shape == (1, len(trained.labels))
    errors = seen["errors"]
    assert errors["not_an_image"].startswith("StatusCode.INVALID_ARGUMENT"), errors
    assert errors["unknown_model"].startswith("StatusCode.NOT_FOUND") and "nope" in errors["unknown_model"]
    assert errors["unknown_version"].startswith("StatusCode.NOT_FOUND"), errors
    assert errors["no_key"].startswith("StatusCode.UNAUTHENTICATED"), errors
    stream = seen["stream"]
    assert set(stream) == {"s-0", "s-2", "error-0"} or set(stream) == {"s-0", "s-2", "error-1"} or \
        set(stream) == {"s-0", "s-2", "error-2"}, stream
    np.testing.assert_allclose(stream["s-0"], expected, atol=1e-5)


def test_tf_serving_stubs_unchanged(server: LiveServer, trained: Trained) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    images = [p.read_bytes() for p in trained.test_paths[:3]]
    rest = httpx.post(server.url + "/v1/models/clothing:predict", headers=AUTH, timeout=60,
                      json={"instances": [{"b64": base64.b64encode(b).decode()} for b in images]})
    assert rest.status_code == 200, rest.text
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "clothing"
        req.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
        resp = stub.Predict(req, timeout=60, metadata=tuple(AUTH.items()))
        np.testing.assert_allclose(tf.make_ndarray(resp.outputs["probabilities"]), rest.json()["predictions"],
                                   atol=1e-5)
        assert resp.model_spec.version.value == trained.version
        pixels = np.full((2, trained.height, trained.width, 3), 128, np.uint8)
        req.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels))
        req.model_spec.version.value = trained.version
        assert tf.make_ndarray(stub.Predict(req, timeout=60, metadata=tuple(AUTH.items()))
                               .outputs["probabilities"]).shape == (2, len(trained.labels))

        creq = classification_pb2.ClassificationRequest()
        creq.model_spec.name = "clothing"
        example = creq.input.example_list.examples.add()
        example.features.feature["image/encoded"].bytes_list.value.append(images[0])
        classes = stub.Classify(creq, timeout=60, metadata=tuple(AUTH.items())).result.classifications[0].classes
        best = int(np.argmax(rest.json()["predictions"][0]))
        assert classes[0].label == trained.labels[best] and len(classes) == len(trained.labels)

        mreq = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        mreq.model_spec.name = "clothing"
        meta = stub.GetModelMetadata(mreq, timeout=30)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        meta.metadata["signature_def"].Unpack(sigs)
        assert sigs.signature_def["serving_default"].outputs["probabilities"].dtype == tf.float32.as_datatype_enum

        sreq = get_model_status_pb2.GetModelStatusRequest()
        sreq.model_spec.name = "clothing"
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(sreq, timeout=30)
        assert [(s.version, s.state) for s in status.model_version_status] == [
            (trained.version, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]

        req.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(req, timeout=30, metadata=tuple(AUTH.items()))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "Servable not found" in err.value.details()


def test_two_processes_serve_grpc_on_one_port_and_metrics_add_up(trained: Trained, tmp_path: Path) -> None:
    shutil.copytree(trained.store, tmp_path / "store")
    server = start_server(tmp_path / "store", tmp_path, IMGSERVE_WORKERS="2")
    try:
        image = trained.test_paths[0].read_bytes()

        def per_process() -> dict[str, float]:
            text = httpx.get(server.url + "/metrics", timeout=10).text
            return {line.split('pid="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines() if line.startswith("imgserve_server_process_requests{")}

        before = per_process()
        calls = 40
        for _ in range(calls):  # a new connection each: the kernel spreads them over the processes
            probs, _ = grpc_infer(server.grpc_target, "clothing", [image])
            assert probs.shape == (1, len(trained.labels))
        after = per_process()
        assert sorted(after) == sorted(str(pid) for pid in server.workers())
        # each process answered gRPC calls: more than the one scrape that can fall on it in between
        assert all(after[pid] - before.get(pid, 0) >= 2 for pid in after), (before, after)
        text = httpx.get(server.url + "/metrics", timeout=10).text
        assert metric_sum(text, "imgserve_grpc_requests_total", method="ModelInfer", code="OK") == calls
    finally:
        assert server.stop() == 0


def test_draining_is_not_serving_and_refuses_new_calls(trained: Trained, tmp_path: Path) -> None:
    shutil.copytree(trained.store, tmp_path / "store")
    server = start_server(tmp_path / "store", tmp_path, IMGSERVE_SHUTDOWN_DELAY_S="30")
    image = trained.test_paths[0].read_bytes()
    assert wait_until(lambda: grpc_health(server.grpc_target) == "SERVING", 30, "health SERVING")
    server.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: grpc_health(server.grpc_target) == "NOT_SERVING", 30, "health NOT_SERVING")
    with pytest.raises(grpc.RpcError) as err:
        grpc_infer(server.grpc_target, "clothing", [image])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()  # type: ignore[attr-defined]
    assert server.stop(timeout=60) == 0  # a second SIGTERM ends the delay: a clean exit


def readme_examples() -> dict[str, str]:
    """The README's two gRPC examples, by the client package they import."""
    text = (REPO / "README.md").read_text().split("### gRPC", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    return {("tritonclient" if "tritonclient" in b else "tfserving"): b for b in blocks}


def test_the_readme_grpc_examples_run_as_written(server: LiveServer, trained: Trained, triton_python: Path,
                                                 tmp_path: Path) -> None:
    """Each example, with only the address and the model name changed, run by its own client package (the
    examples send no key: a server of their own, started without one)."""
    examples = readme_examples()
    assert set(examples) == {"tritonclient", "tfserving"}
    shutil.copy(trained.test_paths[0], tmp_path / "photo.jpg")
    open_server = start_server(server.log.parent / "store", tmp_path)
    try:
        for name, python in (("tritonclient", triton_python), ("tfserving", Path(sys.executable))):
            code = examples[name].replace("localhost:8001", open_server.grpc_target).replace("demo-shapes", "clothing")
            r = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
            printed = r.stdout.strip()
            assert printed.startswith("[["), printed
            if name == "tritonclient":
                assert printed.count(":") == 6  # three "score:index:label" strings
    finally:
        assert open_server.stop() == 0


def test_a_taken_grpc_port_stops_the_server_with_the_reason(trained: Trained, tmp_path: Path) -> None:
    """A port in use is an error that names it (alone, gRPC does not share its port); the test harness then
    starts the server again on other ports, as it does when a port found free is taken before the bind."""
    import socket

    shutil.copytree(trained.store, tmp_path / "store")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(tmp_path / "store", tmp_path, IMGSERVE_GRPC_PORT=str(port))
        try:
            assert server.grpc_port != port and grpc_health(server.grpc_target) == "SERVING"
        finally:
            assert server.stop() == 0
    (refused,) = tmp_path.glob("server-*-port-taken-1.log")  # the first attempt's log
    assert "Failed to bind" in refused.read_text() and str(port) in refused.read_text()


def test_the_h2load_grpc_generator_makes_real_model_infer_calls(server: LiveServer) -> None:
    """bench.grpc_load's compiled generator (h2load sending a framed ModelInferRequest) makes calls the
    server answers OK; and h2load sees HTTP 200 for a call gRPC refused, which is why the benchmark counts
    errors by the server's gRPC status codes."""
    from bench.grpc_load import h2load_grpc

    image = sorted((CLOTHING / "validation").rglob("*.jpg"))[0]
    counted = lambda code: metric_sum(server.metrics(), "imgserve_grpc_requests_total",  # noqa: E731
                                      method="ModelInfer", code=code)
    ok0, refused0 = counted("OK"), counted("UNAUTHENTICATED")
    res = h2load_grpc(server.grpc_target, "clothing", image.read_bytes(), 2, 2, 1, (f"authorization: Bearer {KEY}",))
    assert res["http_ok"] > 0 and res["statuses"] == {"200": res["http_ok"]}
    assert counted("OK") - ok0 >= res["http_ok"]  # warm-up calls are counted too
    assert counted("UNAUTHENTICATED") == refused0
    res = h2load_grpc(server.grpc_target, "clothing", image.read_bytes(), 1, 1, 0)  # no key
    assert res["http_ok"] > 0 and counted("UNAUTHENTICATED") - refused0 >= res["http_ok"]
