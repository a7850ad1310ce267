"""The model store in object storage, against a real S3 API (moto's server on 127.0.0.1; the client
library is not mocked): publish, list, fetch into the local cache, serve, hot reload, and the faults:
an unreachable store, a half-uploaded version, a file rewritten during the copy, a full disk, a bounded
cache, a warm restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import remote
from service.remote import Mirror, RemoteError, publish_version
from service.store import read_metadata
from tests.support import (
    LABELS,
    REPO,
    S3,
    app_client,
    eventually_async,
    free_port,
    jpeg,
    metric_sum,
    wait_until,
    write_fake_version,
)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BACKOFF_S", (0.05,))


def publish(s3: S3, tmp: Path, name: str = "fake", **meta: Any) -> int:
    """A version made locally (fake runtime, real files), uploaded as the next version in the bucket."""
    local = tmp / f"local-{len(list(tmp.glob('local-*')))}"
    version_dir = write_fake_version(local, name, 1, LABELS, **meta)
    (version_dir / "variables").mkdir(exist_ok=True)
    (version_dir / "variables" / "variables.data-00000-of-00001").write_bytes(b"w" * 50_000)
    return publish_version(version_dir, s3.url, name, s3.endpoint)


def mirror(s3: S3, cache: Path, max_bytes: int = 1 << 30) -> Mirror:
    return Mirror.open(s3.url, cache, max_bytes, s3.endpoint)


def test_publish_uploads_model_json_last_and_numbers_past_incomplete_versions(s3: S3, tmp_path: Path) -> None:
    assert publish(s3, tmp_path) == 1
    keys = s3.keys()
    assert "models/fake/1/model.json" in keys and "models/fake/1/variables/variables.data-00000-of-00001" in keys
    # an interrupted upload: files of version 2, no model.json
    s3.client().put_object(Bucket=s3.bucket, Key="models/fake/2/saved_model.pb", Body=b"partial")
    m = mirror(s3, tmp_path / "cache")
    assert m.sync() and sorted(m.listing["fake"]) == [1, 2]
    assert [p.name for p in (tmp_path / "cache" / "fake").iterdir() if not p.name.startswith(".")] == ["1"]
    assert publish(s3, tmp_path) == 3  # never reuses the interrupted version's number
    assert m.sync() and sorted(p.name for p in (tmp_path / "cache" / "fake").iterdir()) == ["1", "3"]
    # a version made under another name is published under the name asked for, its model.json saying so
    local = write_fake_version(tmp_path / "elsewhere", "made-as", 1, LABELS)
    assert publish_version(local, s3.url, "renamed", s3.endpoint) == 1
    body = s3.client().get_object(Bucket=s3.bucket, Key="models/renamed/1/model.json")["Body"].read()
    assert json.loads(body)["name"] == "renamed" and json.loads(body)["version"] == 1
    assert m.sync()
    assert read_metadata(m.fetch("renamed", 1), name="renamed", version=1).name == "renamed"  # what the server checks


def test_fetch_copies_a_whole_version_checked_and_a_warm_cache_copies_nothing(s3: S3, tmp_path: Path) -> None:
    publish(s3, tmp_path)
    m = mirror(s3, tmp_path / "cache")
    assert m.sync()
    stub = tmp_path / "cache" / "fake" / "1"
    assert (stub / "model.json").is_file() and not (stub / "variables").exists()  # listing copies metadata only
    path = m.fetch("fake", 1)
    assert (path / "variables" / "variables.data-00000-of-00001").stat().st_size == 50_000
    again = mirror(s3, tmp_path / "cache")  # a restart with the cache warm
    copied: list[str] = []
    real = again.fs.get_file
    again.fs.get_file = lambda src, dst, **kw: (copied.append(src), real(src, dst, **kw))[1]
    assert again.sync() and again.fetch("fake", 1) == path
    assert copied == []


def test_a_file_rewritten_during_the_copy_is_never_served_and_the_next_attempt_succeeds(s3: S3,
                                                                                       tmp_path: Path) -> None:
    publish(s3, tmp_path)
    m = mirror(s3, tmp_path / "cache")
    assert m.sync()
    real = m.fs.get_file

    def meddling(src: str, dst: str, **kw: Any) -> Any:
        if src.endswith("variables.data-00000-of-00001"):  # the publisher rewrites model.json meanwhile
            body = s3.client().get_object(Bucket=s3.bucket, Key="models/fake/1/model.json")["Body"].read()
            s3.client().put_object(Bucket=s3.bucket, Key="models/fake/1/model.json", Body=body + b" ")
        return real(src, dst, **kw)

    m.fs.get_file = meddling
    with pytest.raises(RemoteError, match="changed while"):
        m.fetch("fake", 1)
    assert not m.is_fetched("fake", 1) and not list((tmp_path / "cache" / "fake").glob(".fetch-*"))
    m.fs.get_file = real
    assert m.sync()  # the new model.json's ETag: tried again at once
    assert m.fetch("fake", 1) and m.is_fetched("fake", 1)


def test_a_full_disk_and_a_full_cache_are_errors_that_name_the_cause(s3: S3, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BACKOFF_S", (0.0,))
    publish(s3, tmp_path)
    publish(s3, tmp_path)
    m = mirror(s3, tmp_path / "cache", max_bytes=80_000)  # room for one version
    assert m.sync()
    m.fetch("fake", 1)
    with pytest.raises(RemoteError, match="do not fit"):
        m.fetch("fake", 2, keep={("fake", 1)})  # version 1 is being served: not evicted
    assert m.is_fetched("fake", 1)
    m.fetch("fake", 2)  # version 1 is not served any more: evicted back to its metadata
    assert m.is_fetched("fake", 2) and not m.is_fetched("fake", 1)
    assert (tmp_path / "cache" / "fake" / "1" / "model.json").is_file()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 10))  # type: ignore[attr-defined]
    with pytest.raises(RemoteError, match="disk .* is full"):
        m.fetch("fake", 1)


async def test_the_service_serves_from_the_bucket_hot_reloads_and_keeps_serving_when_the_store_fails(
        tmp_path: Path, s3_endpoint: str) -> None:
    from moto.server import ThreadedMotoServer

    port = free_port()
    own = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # a server this test stops
    own.start()
    s3 = S3(f"http://127.0.0.1:{port}", "models")
    s3.client().create_bucket(Bucket=s3.bucket)
    try:
        await _serve_then_lose_the_store(s3, own, tmp_path)
    finally:
        own.stop()


async def _serve_then_lose_the_store(s3: S3, server: Any, tmp_path: Path) -> None:
    publish(s3, tmp_path)
    settings = {**s3.settings(), "store_cache_dir": tmp_path / "cache", "rollout_mode": "immediate"}
    async with app_client(tmp_path / "unused", **settings) as client:
        r = await client.post("/predict", content=jpeg(250), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["version"] == 1
        models = (await client.get("/v1/models")).json()
        assert models["store"]["url"] == s3.url and models["store"]["error"] is None
        publish(s3, tmp_path)

        async def version() -> int:
            r = await client.post("/predict", content=jpeg(250), headers={"Content-Type": "image/jpeg"})
            return int(r.json()["version"])

        await eventually_async(version, lambda v: v == 2, 30, "version 2 served")
        server.stop()  # the endpoint is gone: connections are refused

        async def store_error() -> dict[str, Any]:
            return (await client.get("/v1/models")).json()["store"]  # type: ignore[no-any-return]

        status = await eventually_async(store_error, lambda s: s["error"], 30, "the store error shown")
        assert "Could not connect" in status["error"] or "Connection" in status["error"], status
        assert await version() == 2  # still served

        async def sync_errors() -> float:
            return metric_sum((await client.get("/metrics")).text, "imgserve_store_syncs_total", outcome="error")

        await eventually_async(sync_errors, lambda n: n >= 1, 30, "the failed listing counted")


async def test_readiness_says_what_it_waits_for_and_a_fetch_failure_keeps_the_version_out(
        s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {**s3.settings(), "model_store": f"s3://{s3.bucket}-missing/models",
                "store_cache_dir": tmp_path / "cache"}
    async with app_client(tmp_path / "unused", ready=False, **settings) as client:
        async def ready() -> httpx.Response:
            return await client.get("/health/ready")

        r = await eventually_async(ready, lambda r: "could not be read" in r.text, 30, "the reason")
        assert r.status_code == 503 and f"{s3.bucket}-missing' does not exist" in r.json()["error"]
    publish(s3, tmp_path)
    full = monkeypatch.context()
    with full as patch:
        patch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 10))  # type: ignore[attr-defined]
        async with app_client(tmp_path / "unused", ready=False, **{**s3.settings(), "store_cache_dir": tmp_path / "c2"}
                              ) as client:
            r = await eventually_async(ready, lambda r: "full" in r.text, 30, "the disk reason")
            assert r.status_code == 503
            entry = (await client.get("/v1/models")).json()["models"][0]["versions"][0]
            assert entry["state"] == "NOT_LOADED" and "full" in entry["reason"]
            patch.undo()
            await eventually_async(ready, lambda r: r.status_code == 200, 30, "ready once the disk has room")


async def test_rollout_commands_write_the_state_into_the_bucket(s3: S3, tmp_path: Path) -> None:
    publish(s3, tmp_path)
    publish(s3, tmp_path)
    env = {**os.environ, "IMGSERVE_S3_ENDPOINT_URL": s3.endpoint}
    r = subprocess.run([sys.executable, "-m", "service.rollout", "--store", s3.url, "fake", "label", "old", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    state = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="models/fake/rollout.json")["Body"].read())
    assert state["labels"] == {"old": 1}
    settings = {**s3.settings(), "store_cache_dir": tmp_path / "cache", "admin_api_key": "adm1n"}
    async with app_client(tmp_path / "unused", **settings) as client:
        r = await client.post("/predict?label=old", content=jpeg(250), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["version"] == 1  # the label set from the command line
        r = await client.post("/v1/models/fake/rollout/label", json={"label": "new", "version": 2},
                              headers={"X-API-Key": "adm1n"})
        assert r.status_code == 200, r.text
    state = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="models/fake/rollout.json")["Body"].read())
    assert state["labels"] == {"old": 1, "new": 2}


def test_another_fsspec_scheme_works_the_same_way(tmp_path: Path) -> None:
    """A `file://` URL (fsspec's local filesystem) stands for any scheme whose fsspec package is installed."""
    url = f"file://{tmp_path / 'bucket'}"
    (tmp_path / "bucket").mkdir()
    local = write_fake_version(tmp_path / "made", "fake", 1, LABELS)
    assert publish_version(local, url, "fake") == 1
    m = Mirror.open(url, tmp_path / "cache", 1 << 30)
    assert m.sync() and sorted(m.listing["fake"]) == [1]
    assert read_metadata(m.fetch("fake", 1), name="fake", version=1).version == 1


async def test_wrong_credentials_are_refused_by_the_store_and_said_so(tmp_path: Path) -> None:
    """An S3 server that checks keys (moto with authentication on, in a process of its own): the service
    with a key the store does not know is not ready, and says why."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}  # moto authenticates every request
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(endpoint + "/moto-api/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "the S3 server")
        settings = {"model_store": "s3://models/store", "s3_endpoint_url": endpoint, "s3_access_key_id": "nobody",
                    "s3_secret_access_key": "wrong", "store_cache_dir": tmp_path / "cache"}
        async with app_client(tmp_path / "unused", ready=False, **settings) as client:
            async def ready() -> httpx.Response:
                return await client.get("/health/ready")

            r = await eventually_async(ready, lambda r: "could not be read" in r.text, 30, "the reason")
            assert r.status_code == 503
            assert "InvalidAccessKeyId" in r.text or "AccessDenied" in r.text or "PermissionError" in r.text, r.text
    finally:
        proc.terminate()
        proc.wait(30)
