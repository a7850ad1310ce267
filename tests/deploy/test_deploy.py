"""Static checks of the container, compose, Kubernetes and monitoring files against the real service,
and the container's entrypoint run for real outside Docker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from service.app import create_app
from service.settings import Settings
from tests.support import REPO, app_client, eventually_async, free_port, jpeg, write_fake_version

BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
K8S = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (REPO / "deploy" / "k8s").glob("*.yaml")}
SETTINGS_ENV = {f"IMGSERVE_{n.upper()}" for n in Settings.model_fields}
ENTRYPOINT_ENV = {"DEMO_IF_EMPTY", "DEMO_STORE", "DEMO_ARGS"}


def app_paths() -> set[str]:
    """The paths the app documents (and serves) in its OpenAPI schema."""
    return set(create_app(Settings()).openapi()["paths"])


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it")
    return found


def test_compose_validates_against_the_compose_spec() -> None:
    r = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                        str(REPO / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _env_names(env: Any) -> set[str]:
    if isinstance(env, dict):
        return set(env)
    return {e.split("=", 1)[0] for e in env or []}


def test_compose_wiring_matches_the_service() -> None:
    services = COMPOSE["services"]
    api = services["api"]
    paths = app_paths()
    assert "8000:8000" in api["ports"] and "8001:8001" in api["ports"]  # HTTP and gRPC
    assert "models:/models:ro" in api["volumes"]  # the store is read-only to the service
    health = " ".join(api["healthcheck"]["test"])
    served = re.search(r"127\.0\.0\.1:8000(/[a-z/]+)", health)
    assert served and served.group(1) == "/health/ready" and served.group(1) in paths
    for name, svc in services.items():
        unknown = {e for e in _env_names(svc.get("environment")) if e.startswith("IMGSERVE_")} - SETTINGS_ENV
        assert not unknown, f"{name} sets variables the service does not read: {unknown}"
    env = api["environment"]
    grace = float(api["stop_grace_period"].rstrip("s"))
    assert grace > float(env["IMGSERVE_DRAIN_TIMEOUT_S"]) + 5
    assert api["mem_limit"]
    assert env["IMGSERVE_MODEL_STORE"] == "/models"
    assert services["api"]["depends_on"]["demo-init"]["condition"] == "service_completed_successfully"
    assert "models:/models" in services["demo-init"]["volumes"]
    train = services["train"]
    assert train["profiles"] == ["train"] and "models:/models" in train["volumes"]
    assert train["entrypoint"] == ["python", "-m", "train"]
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["IMGSERVE_BATCHES_IN_FLIGHT"] == "2"
    assert gpu["environment"]["IMGSERVE_MODEL_STORE"] == "/models"  # the shared settings are kept
    prom_volumes = services["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom_volumes
    for svc in services.values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{src} is mounted but missing"


def test_prometheus_config_targets_the_api() -> None:
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    target = cfg["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "api:8000" and cfg["scrape_configs"][0]["metrics_path"] in app_paths()


def test_promtool_checks_config_and_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "config", "deploy/prometheus/prometheus.yml"],
                 ["check", "rules", "deploy/prometheus/rules.yml"]):
        r = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


async def exposed_metric_names(tmp_path: Path) -> set[str]:
    """Every metric family the service exposes once it has answered requests with a shadow version beside
    the stable one, and read a rollout file it could not use."""
    from service import rollout
    from service.quality import reference_from

    reference = reference_from(np.array([[0.9, 0.1], [0.3, 0.7]])).model_dump()  # the drift score's baseline
    write_fake_version(tmp_path, "fake", 1, ["a", "b"], reference=reference)
    write_fake_version(tmp_path, "fake", 2, ["a", "b"])
    rollout.write(tmp_path, "fake", rollout.RolloutState(stable=1, shadow=2, shadow_percent=100, seen=2))
    async with app_client(tmp_path, drift_window=1) as c:  # a score after one answer
        await eventually_async(lambda: c.get("/v1/models"), lambda r: r.json()["models"][0]["rollout"]["shadow"] == 2)
        await c.post("/predict", content=jpeg(10), headers={"Content-Type": "image/jpeg"})
        await c.post("/predict", content=b"x", headers={"Content-Type": "image/jpeg"})
        await eventually_async(lambda: c.get("/metrics"), lambda r: "imgserve_shadow_rows_total{" in r.text)
        (tmp_path / "fake" / "rollout.json").write_text("{")
        text = (await eventually_async(lambda: c.get("/metrics"),
                                       lambda r: "imgserve_rollout_state_errors_total{" in r.text)).text
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names_in(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{|\[|\)|$|\s*/|\s*>)", expr))
    keywords = {"sum", "rate", "by", "le", "histogram_quantile", "increase", "max", "on", "model", "version",
                "reason", "status", "handler", "instance", "outcome", "job", "service", "role", "against", "and"}
    return {w for w in words if w not in keywords and (w.startswith(("imgserve", "process_")))}


def test_dashboard_and_rules_name_only_exposed_metrics(tmp_path: Path) -> None:
    exposed = asyncio.run(exposed_metric_names(tmp_path))
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "imgserve.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert len(used) >= 10
    missing = sorted(used - exposed - recorded)
    assert missing == [], f"queries name metrics the service does not expose: {missing}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("images per second", "latency", "batch size", "queue depth", "rejections", "version served"):
        assert word in titles
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == dash["panels"][0]["datasource"]["uid"]


def test_kubernetes_manifests_validate() -> None:
    core = [str(REPO / "deploy" / "k8s" / n) for n in ("deployment.yaml", "service.yaml", "store.yaml")]
    r = subprocess.run([tool("kubernetes-validate"), "--strict", *core], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (scaled,) = K8S["scaledobject.yaml"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "imgserve"
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert "imgserve_inflight_rows" in query
    (monitor,) = K8S["servicemonitor.yaml"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    kustom = yaml.safe_load((REPO / "deploy" / "k8s" / "kustomization.yaml").read_text())
    assert set(kustom["resources"]) == set(K8S) - {"kustomization.yaml"}


def test_kubernetes_deployment_matches_the_service() -> None:
    (dep,) = K8S["deployment.yaml"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].startswith("imgserve:serve")  # the serving image: no TensorFlow to pull on every replica
    paths = app_paths()
    env = {e["name"]: e.get("value") for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(env["IMGSERVE_PORT"]), "grpc": int(env["IMGSERVE_GRPC_PORT"])}
    for probe in ("startupProbe", "readinessProbe"):  # grpc.health.v1, NOT_SERVING while loading or draining
        assert c[probe]["grpc"]["port"] == ports["grpc"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live" and "/health/live" in paths
    assert set(env) <= SETTINGS_ENV
    drain = float(env["IMGSERVE_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > drain + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "/tmp" in mounts  # writable scratch on a read-only root filesystem
    # the store is a bucket (no shared volume): its URL from the ConfigMap, the credentials from a Secret,
    # and this replica's copy on a volume of its own, bounded below that volume's size
    refs = {e["name"]: e.get("valueFrom", {}) for e in c["env"]}
    (store_cm,) = K8S["store.yaml"]
    assert refs["IMGSERVE_MODEL_STORE"]["configMapKeyRef"]["name"] == store_cm["metadata"]["name"]
    assert store_cm["data"]["url"].startswith("s3://")
    assert refs["IMGSERVE_S3_SECRET_ACCESS_KEY"]["secretKeyRef"]["key"] == "secret-access-key"
    cache = mounts[env["IMGSERVE_STORE_CACHE_DIR"]]
    volume = next(v for v in pod["volumes"] if v["name"] == cache["name"])
    assert float(env["IMGSERVE_STORE_CACHE_MAX_GB"]) < float(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    (svc,) = K8S["service.yaml"]
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"http": "http", "grpc": "grpc"}


def test_dockerfile_lints_and_follows_the_rules() -> None:
    files = [REPO / "Dockerfile", REPO / "deploy" / "lb" / "Dockerfile", REPO / "deploy" / "s3" / "Dockerfile"]
    r = subprocess.run([tool("hadolint"), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    deps = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pyproject.toml"))
    src = next(i for i, ln in enumerate(lines) if ln.startswith("COPY service"))
    assert deps < src  # dependencies are installed before the source is copied
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r'^CMD \["python", "-m", "service"\]$', text, re.M)  # exec form: the server gets SIGTERM
    assert re.search(r'^ENTRYPOINT \["imgserve-entrypoint"\]$', text, re.M)
    health = re.search(r"HEALTHCHECK.*\n.*127\.0\.0\.1:8000(/[a-z/]+)", text)
    assert health and health.group(1) == "/health/live"
    assert "ARG BASE_IMAGE" in text and "EXTRAS" in text
    env_names = set(re.findall(r"(IMGSERVE_[A-Z_]+)=", text))
    assert env_names and env_names <= SETTINGS_ENV
    ignored = (REPO / ".dockerignore").read_text().split()
    for must in ("model_store", ".venv", ".git", "data", "*.env", "secrets"):
        assert must in ignored


@pytest.mark.slow
def test_entrypoint_trains_demo_when_store_is_unusable_then_serves(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DEMO_IF_EMPTY": "1", "IMGSERVE_MODEL_STORE": str(tmp_path / "missing" / "models"),
           "DEMO_STORE": str(tmp_path / "demo-store"), "DEMO_ARGS": "--per-class 24 --epochs 2 --image-size 32",
           "IMGSERVE_HOST": "127.0.0.1", "IMGSERVE_PORT": str(port), "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = tmp_path / "entrypoint.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["sh", str(REPO / "docker" / "entrypoint.sh"), "python", "-m", "service"],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200
            if ready:
                break
            time.sleep(0.5)
        assert ready, log.read_text()[-3000:]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]
        assert models[0]["name"] == "demo-shapes"
        assert (tmp_path / "demo-store" / "demo-shapes" / "1" / "model.json").is_file()
        r = httpx.post(f"http://127.0.0.1:{port}/predict", content=jpeg(200), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["model"] == "demo-shapes"
        proc.send_signal(signal.SIGTERM)  # exec: the signal reaches the server itself
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "training the demo model" in log.read_text()


def test_entrypoint_leaves_a_store_with_models_alone(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "fake", 1, ["a", "b"])
    env = {**os.environ, "DEMO_IF_EMPTY": "1", "IMGSERVE_MODEL_STORE": str(tmp_path)}
    r = subprocess.run(["sh", str(REPO / "docker" / "entrypoint.sh"), "sh", "-c", "echo $IMGSERVE_MODEL_STORE"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path)
    assert "training" not in r.stderr
