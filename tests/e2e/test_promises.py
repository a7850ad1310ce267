"""What the README promises about the server, checked on a real one: API keys on every protocol (from the
environment and from a secrets folder), never logged, not needed for health and metrics; CORS; JSON logs;
pinned versions and the default model; the cap on a request's own deadline; keep-alive closing; and the
runtime serving each version wherever the README says it is shown."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.support import LiveServer, Trained, clone_version, clothing_images, metric_sum, start_server

pytestmark = pytest.mark.slow
KEY, ADMIN = "k3y-4-predict-9f2c", "adm1n-k3y-77e1"
CORS = "http://app.example"


@pytest.fixture(scope="module")
def guarded(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Keys from a secrets folder (as a mounted Kubernetes or Docker secret), JSON logs at DEBUG, CORS for
    one origin, two versions pinned to the first, a second model and a default model, a 1 s keep-alive."""
    tmp = tmp_path_factory.mktemp("guarded")
    store = tmp / "store"
    shutil.copytree(trained.store, store)
    clone_version(store, trained.name, trained.version, trained.version + 1)
    shutil.copytree(store / trained.name, store / "other")
    for v in (p for p in (store / "other").iterdir() if p.name.isdigit()):
        doc = json.loads((v / "model.json").read_text())
        (v / "model.json").write_text(json.dumps({**doc, "name": "other"}))
    secrets = tmp / "secrets"
    secrets.mkdir()
    (secrets / "imgserve_api_key").write_text(KEY + "\n")
    (secrets / "imgserve_admin_api_key").write_text(ADMIN)
    server = start_server(store, tmp, IMGSERVE_SECRETS_DIR=str(secrets), IMGSERVE_LOG_JSON="true",
                          IMGSERVE_LOG_LEVEL="DEBUG", IMGSERVE_CORS_ORIGINS=CORS,
                          IMGSERVE_PINNED_VERSIONS=f"{trained.name}={trained.version}",
                          IMGSERVE_DEFAULT_MODEL="other", IMGSERVE_MAX_REQUEST_TIMEOUT_MS="5000", IMGSERVE_REQUEST_TIMEOUT_MS="5000",
                          IMGSERVE_KEEP_ALIVE_TIMEOUT_S="1")
    yield server
    server.stop(signal.SIGKILL)


def routes(trained: Trained) -> dict[str, dict[str, object]]:
    image = clothing_images(1)[0].read_bytes()
    b64 = base64.b64encode(image).decode()
    return {
        "native": {"url": f"/predict?model={trained.name}", "content": image,
                   "headers": {"Content-Type": "image/jpeg"}},
        "tfserving": {"url": f"/v1/models/{trained.name}:predict", "json": {"instances": [{"b64": b64}]}},
        "kserve": {"url": f"/v2/models/{trained.name}/infer",
                   "json": {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}]}},
    }


@pytest.mark.parametrize("protocol", ["native", "tfserving", "kserve"])
def test_every_predict_route_needs_the_key(guarded: LiveServer, trained: Trained, protocol: str) -> None:
    req = routes(trained)[protocol]
    url, headers = str(req.pop("url")), dict(req.pop("headers", {}))  # type: ignore[call-overload]
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        for given, status in [({}, 401), ({"X-API-Key": "wrong"}, 401), ({"Authorization": f"Bearer {ADMIN}x"}, 401),
                              ({"X-API-Key": KEY}, 200), ({"Authorization": f"Bearer {KEY}"}, 200)]:
            r = c.post(url, headers={**headers, **given}, **req)  # type: ignore[arg-type]
            assert r.status_code == status, (protocol, given, r.text[:200])
            if status == 401:
                assert r.json()["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"


def test_repository_calls_need_the_admin_key_and_health_and_metrics_none(guarded: LiveServer) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        assert c.post("/v2/repository/index", headers={"X-API-Key": KEY}).status_code == 401
        index = c.post("/v2/repository/index", headers={"X-API-Key": ADMIN})
        assert index.status_code == 200 and {m["name"] for m in index.json()} == {"clothing", "other"}
        for path in ("/health/live", "/health/ready", "/v2/health/ready", "/metrics"):
            assert c.get(path).status_code == 200, path


def test_keys_are_never_logged_and_logs_are_json(guarded: LiveServer, trained: Trained) -> None:
    req = routes(trained)["native"]
    httpx.post(guarded.url + str(req["url"]), content=req["content"],  # type: ignore[arg-type]
               headers={"Content-Type": "image/jpeg", "X-API-Key": KEY}, timeout=30)
    httpx.post(guarded.url + "/v2/repository/index", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    httpx.post(guarded.url + str(req["url"]), content=b"x", headers={"X-API-Key": KEY[:-1] + "Z"}, timeout=30)
    logs = guarded.logs()
    assert KEY not in logs and ADMIN not in logs and KEY[:-1] + "Z" not in logs
    lines = [line for line in logs.splitlines() if line.strip()]
    assert len(lines) > 5
    for line in lines:
        record = json.loads(line)  # every line one JSON object
        assert {"level", "message"} <= set(record), record


def test_cors_answers_the_listed_origin_only(guarded: LiveServer) -> None:
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        ok = c.options("/predict", headers={"Origin": CORS, **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == CORS
        other = c.options("/predict", headers={"Origin": "http://evil.example", **pre})
        assert "access-control-allow-origin" not in other.headers
        assert c.get("/v1/models", headers={"Origin": CORS}).headers["access-control-allow-origin"] == CORS


def test_pinned_version_and_default_model(guarded: LiveServer, trained: Trained) -> None:
    image = clothing_images(1)[0].read_bytes()
    auth = {"X-API-Key": KEY, "Content-Type": "image/jpeg"}
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        versions = c.get("/health/ready").json()["models"]
        assert versions == {trained.name: trained.version, "other": trained.version + 1}  # pinned; the latest
        r = c.post("/predict", content=image, headers=auth)  # no model named: the default one
        assert r.status_code == 200 and r.json()["model"] == "other" and r.json()["version"] == trained.version + 1
        r = c.post(f"/predict?model={trained.name}", content=image, headers=auth)
        assert r.json()["version"] == trained.version
        r = c.post(f"/predict?model={trained.name}&version={trained.version + 1}", content=image, headers=auth)
        assert r.status_code == 404  # present in the store, but the pin serves the other one


def test_a_deadline_above_the_cap_is_refused(guarded: LiveServer) -> None:
    image = clothing_images(1)[0].read_bytes()
    for value, status in [("5000", 200), ("5001", 400), ("0", 400), ("soon", 400)]:
        r = httpx.post(guarded.url + "/predict", content=image, timeout=30,
                       headers={"X-API-Key": KEY, "Content-Type": "image/jpeg", "X-Request-Timeout-Ms": value})
        assert r.status_code == status, (value, r.text)
    assert "between 1 and 5000" in r.json()["error"] or "whole number" in r.json()["error"]


def test_an_idle_keep_alive_connection_is_closed_by_the_server(guarded: LiveServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=60)
    conn.request("GET", "/health/live")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b'{"status":"live"}' and r.getheader("connection") != "close"
    assert conn.sock is not None
    assert conn.sock.recv(1) == b""  # the server closes the idle connection (else: a socket timeout here)
    conn.close()


def test_the_runtime_of_each_version_is_shown_everywhere(guarded: LiveServer, trained: Trained) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30, headers={"X-API-Key": KEY}) as c:
        ready = c.get("/health/ready").json()["runtimes"][trained.name]
        assert ready["runtime"] in ("openvino", "tensorflow") and ready["precision"] in ("fp32", "bf16", "int8")
        model = next(m for m in c.get("/v1/models").json()["models"] if m["name"] == trained.name)
        assert (model["runtime"], model["precision"]) == (ready["runtime"], ready["precision"])
        tfs = c.get(f"/v1/models/{trained.name}/metadata").json()
        assert (tfs["runtime"], tfs["precision"]) == (ready["runtime"], ready["precision"])
        kserve = c.get(f"/v2/models/{trained.name}").json()
        assert kserve["platform"].startswith(ready["runtime"]) or ready["runtime"] in json.dumps(kserve)
        r = c.post(f"/predict?model={trained.name}", content=clothing_images(1)[0].read_bytes(),
                   headers={"Content-Type": "image/jpeg"})
        assert r.headers["x-model-runtime"] == f"{ready['runtime']}/{ready['precision']}"
        info = metric_sum(c.get("/metrics").text, "imgserve_model_runtime_info", model=trained.name,
                          version=str(trained.version), runtime=ready["runtime"], precision=ready["precision"])
        assert info == 1
