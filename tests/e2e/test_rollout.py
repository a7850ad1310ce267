"""Rolling versions out and back on a real server: several versions answer by version and label on all three
protocols; a rollback under load reaches every process with no failed request."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from service import rollout
from tests.support import (
    REPO,
    LiveServer,
    Load,
    Trained,
    clone_version,
    clothing_images,
    served_everywhere,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.slow
SERVER_PROCESSES = ["1", "2"]


def model_versions(server: LiveServer, name: str) -> dict[int, dict[str, object]]:
    models = httpx.get(server.url + "/v1/models", timeout=10).json()["models"]
    return {v["version"]: v for m in models if m["name"] == name for v in m["versions"]}


@pytest.fixture
def three(trained: Trained, tmp_path: Path) -> Iterator[tuple[LiveServer, Path]]:
    store = tmp_path / "store"
    shutil.copytree(trained.store, store)
    v = trained.version
    clone_version(store, trained.name, v, v + 1)
    clone_version(store, trained.name, v, v + 2)
    rollout.write(store, trained.name, rollout.RolloutState(stable=v + 1, labels={"previous": v}, seen=v + 2))
    server = start_server(store, tmp_path, IMGSERVE_VERSION_POLICY="all")
    wait_until(lambda: sum(e["state"] == "AVAILABLE" for e in model_versions(server, trained.name).values()) == 3,
               120, "three versions loaded")
    yield server, store
    server.stop()


def test_versions_and_labels_on_every_protocol(three: tuple[LiveServer, Path], trained: Trained) -> None:
    server, _ = three
    v = trained.version
    image = clothing_images(1)[0].read_bytes()
    b64 = base64.b64encode(image).decode()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for query, want in [("", v + 1), (f"version={v}", v), ("label=previous", v), (f"version={v + 2}", v + 2)]:
            r = c.post(f"/predict?{query}", content=image, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200 and r.json()["version"] == want, (query, r.text)
        for path, want in [(f"/v1/models/{trained.name}/versions/{v}:predict", v),
                           (f"/v1/models/{trained.name}/labels/previous:predict", v),
                           (f"/v1/models/{trained.name}/labels/stable:predict", v + 1),
                           (f"/v1/models/{trained.name}:predict", v + 1)]:
            r = c.post(path, json={"instances": [{"b64": b64}]})
            assert r.status_code == 200 and r.headers["x-model-version"] == str(want), (path, r.text)
        r = c.post(f"/predict?version={v + 7}", content=image, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 404 and f"loaded versions: {v}, {v + 1}, {v + 2}" in r.json()["error"]
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    inp = triton.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image], dtype=np.object_))
    for version in (v, v + 2):
        out = client.infer(trained.name, [inp], model_version=str(version))
        assert out.get_response()["model_version"] == str(version)
    assert client.get_model_metadata(trained.name)["versions"] == [str(x) for x in (v, v + 1, v + 2)]
    client.close()


def test_a_rollback_under_load_reaches_every_process_with_nothing_failed(three: tuple[LiveServer, Path],
                                                                         trained: Trained) -> None:
    server, store = three
    v = trained.version
    with Load(server.url, clothing_images(8), clients=8) as load:
        wait_until(lambda: load.answered() > 50, 60, "load running")
        r = subprocess.run([sys.executable, "-m", "service.rollout", "--store", str(store), trained.name,
                            "rollback"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: served_everywhere(server, trained.name) == {v}, 60, "every process on the old version")
        n = load.answered()
        wait_until(lambda: load.answered() > n + 40, 60, "answers after the rollback")
        after = load.results[n:]
    assert load.errors == [] and {s for s, _, _ in load.results} == {200}
    assert {version for _, version, _ in after[-20:]} == {v}
    entry = model_versions(server, trained.name)[v + 1]
    assert entry["role"] == "held" and "rolled back" in str(entry["reason"])
