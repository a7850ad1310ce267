"""A real uvicorn process serving a real SavedModel made by `train`: batching, hot swap, broken
versions and graceful shutdown, under bounded concurrent load."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.cpu import cpu_has_bf16
from service.imaging import load_image
from service.runtimes import warmup
from service.runtimes.tensorflow import SavedModelRuntime as SavedModelClassifier
from tests.support import (
    LiveServer,
    Load,
    Trained,
    burst,
    clone_version,
    clothing_images,
    post,
    served_everywhere,
    served_runtime,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.slow
SERVER_PROCESSES = ["1", "2"]  # see conftest.py


def test_concurrent_requests_are_answered_correctly(live: LiveServer, trained: Trained) -> None:
    """With the defaults, concurrent requests to this cheap model may each run alone (a lone row that
    finds the model idle runs inline, and a batch closes as soon as no other request is decoding); what
    must hold is that every answer is its own image's."""
    device = httpx.get(live.url + "/health/ready").json()["device"]
    assert device.split(":")[0].split(" ")[0] in ("CPU", "GPU") and f"device: {device}" in live.logs()
    images = clothing_images(24)
    clf = served_runtime(trained)  # the variant the server serves (or its SavedModel)
    rt = httpx.get(live.url + "/health/ready").json()["runtimes"][trained.name]
    assert rt == {"runtime": clf.runtime, "precision": clf.precision}  # type: ignore[attr-defined]
    expected = clf.predict(np.stack([load_image(p, trained.height, trained.width) for p in images]))
    # all 24 in flight together (a thread pool of httpx calls rarely overlapped on a loaded machine)
    answers = burst(live.url, [p.read_bytes() for p in images], len(images),
                    path=f"/predict?top_k={len(trained.labels)}")
    for a, want in zip(answers, expected, strict=True):
        assert a.status == 200, a.body
        top = json.loads(a.body)["predictions"][0]["top"]
        got = np.zeros(len(trained.labels))
        for t in top:
            got[t["index"]] = t["score"]
        np.testing.assert_allclose(got, want, atol=1e-4)  # served == in-process, row by row
    assert live.metric("imgserve_batch_size_sum") >= len(images)
    # one multipart request with several images: answers in order
    with httpx.Client(base_url=live.url, timeout=30) as client:
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in images[:5]]
        r = client.post("/predict", files=files)
    assert [p["filename"] for p in r.json()["predictions"]] == [p.name for p in images[:5]]
    assert [p["top"][0]["index"] for p in r.json()["predictions"]] == list(expected[:5].argmax(axis=1))


def test_requests_within_the_delay_share_a_batch(trained: Trained, tmp_path: Path) -> None:
    """Without the inline run and the idle flush, a batch waits up to its delay for the rows that arrive
    meanwhile: 24 requests sent together are run in batches of several, and each answer is still its own."""
    server = start_server(trained.store, tmp_path, IMGSERVE_INLINE_RUN_MAX_MS="0", IMGSERVE_FLUSH_WHEN_IDLE="false",
                          IMGSERVE_MAX_BATCH_DELAY_MS="250", IMGSERVE_MAX_BATCH_SIZE="8")
    try:
        images = clothing_images(24)
        expected = served_runtime(trained).predict(
            np.stack([load_image(p, trained.height, trained.width) for p in images]))
        answers = burst(server.url, [p.read_bytes() for p in images], len(images), path="/predict?top_k=1")
        for a, want in zip(answers, expected, strict=True):
            assert a.status == 200, a.body
            assert json.loads(a.body)["predictions"][0]["top"][0]["index"] == int(want.argmax())
        count = server.metric("imgserve_batch_size_count")
        rows = server.metric("imgserve_batch_size_sum")
        assert rows == len(images) and count < rows, (count, rows)  # some batch held more than one image
        full = server.metric("imgserve_batches_total", reason="full")
        delay = server.metric("imgserve_batches_total", reason="delay")
        assert full + delay == count, (full, delay, count)  # no idle or inline flush
    finally:
        server.stop()


def test_a_model_costlier_than_the_delay_is_batched_for_efficiency_and_answers_stay_its_own(
        trained: Trained, tmp_path: Path) -> None:
    """With a delay shorter than the model's batch of one, the batcher's costly mode (delay from when the
    model is free, no partial batch beside a running one, split halves) serves a burst: every row once,
    each answer its own."""
    server = start_server(trained.store, tmp_path, IMGSERVE_INLINE_RUN_MAX_MS="0", IMGSERVE_MAX_BATCH_DELAY_MS="0.02",
                          IMGSERVE_BATCHES_IN_FLIGHT="2", IMGSERVE_MAX_BATCH_SIZE="8")
    try:
        assert "batched for efficiency" in server.logs(), server.logs()[-2000:]
        images = clothing_images(24)
        expected = served_runtime(trained).predict(
            np.stack([load_image(p, trained.height, trained.width) for p in images]))
        for _ in range(2):
            answers = burst(server.url, [p.read_bytes() for p in images], len(images), path="/predict?top_k=1")
            for a, want in zip(answers, expected, strict=True):
                assert a.status == 200, a.body
                assert json.loads(a.body)["predictions"][0]["top"][0]["index"] == int(want.argmax())
        assert server.metric("imgserve_batch_size_sum") == 2 * len(images)  # every row ran once
        assert server.metric("imgserve_batches_total", reason="inline") == 0
    finally:
        server.stop()


def test_hot_swap_under_load_loses_nothing(live: LiveServer, trained: Trained, tmp_path: Path) -> None:
    store = Path(httpx.get(live.url + "/v1/models").json() and live.log.parent / "store")
    with Load(live.url, clothing_images(10)) as load:
        assert wait_until(lambda: len(load.results) > 10)
        clone_version(store, trained.name, trained.version, trained.version + 1)
        assert wait_until(lambda: any(v == trained.version + 1 for _, v, _ in load.results[-5:]))
        # with several processes each swaps on its own poll: the swap is atomic once all have made it
        assert wait_until(lambda: served_everywhere(live, trained.name) == {trained.version + 1}, 60)
        swapped_at = len(load.results)
        assert wait_until(lambda: len(load.results) > swapped_at + 10)
    assert load.errors == []
    statuses = {s for s, _, _ in load.results}
    assert statuses == {200}, statuses
    for _, body_version, header_version in load.results:
        assert str(body_version) == header_version  # every answer names the version that made it
    versions = [v for _, v, _ in load.results]
    assert trained.version + 1 in versions
    # the swap is atomic: new requests only go to the new version afterwards (a few in flight may finish on v1)
    assert versions[swapped_at + 8 :].count(trained.version) == 0


# a broken file is refused by the load every process makes alike: two processes are tested by
# test_faults.py's broken versions, which every process must refuse, retry or never serve
@pytest.mark.server_processes("1")
@pytest.mark.parametrize("breakage", ["truncated_pb", "missing_variables", "bad_json", "wrong_labels"])
def test_broken_version_is_refused_old_keeps_serving(live: LiveServer, trained: Trained, breakage: str) -> None:
    store = live.log.parent / "store"

    def break_it(bad: Path) -> None:  # before the copy is renamed into place
        if breakage == "truncated_pb":
            pb = bad / "saved_model.pb"
            pb.write_bytes(pb.read_bytes()[:100])
        elif breakage == "missing_variables":
            shutil.rmtree(bad / "variables")
        elif breakage == "bad_json":
            (bad / "model.json").write_text('{"format": 1, "name": ')
        elif breakage == "wrong_labels":
            clone_path = bad / "model.json"
            clone_path.write_text(clone_path.read_text().replace('"labels": [', '"labels": ["extra", '))

    clone_version(store, trained.name, trained.version, trained.version + 1, edit=break_it)
    image = clothing_images(1)[0]
    with Load(live.url, [image], clients=2) as load:
        assert wait_until(lambda: live.metric("imgserve_model_loads_total", model="clothing",
                                            outcome="failure") >= len(live.workers()))  # refused by every process
        n = len(load.results)
        assert wait_until(lambda: len(load.results) > n + 5)
    assert load.errors == [] and {s for s, _, _ in load.results} == {200}
    assert {v for _, v, _ in load.results} == {trained.version}
    models = httpx.get(live.url + "/v1/models").json()["models"][0]
    states = {v["version"]: v["state"] for v in models["versions"]}
    assert states == {trained.version: "AVAILABLE", trained.version + 1: "FAILED"}


def test_sigterm_under_load_loses_no_accepted_request(trained: Trained, tmp_path: Path) -> None:
    """On SIGTERM readiness turns 503 while the queued rows still wait (for IMGSERVE_SHUTDOWN_DELAY_S, the
    listener open), new requests get 503, then every queued row is run and answered and the process exits 0."""
    store = tmp_path / "store"
    shutil.copytree(trained.store, store)
    # a batch delay far longer than the test keeps rows queued until the drain runs them
    server = start_server(store, tmp_path, IMGSERVE_MAX_BATCH_DELAY_MS="10000", IMGSERVE_MAX_BATCH_SIZE="64",
                          IMGSERVE_FLUSH_WHEN_IDLE="false", IMGSERVE_INLINE_RUN_MAX_MS="0",
                          IMGSERVE_SHUTDOWN_DELAY_S="8")
    image = clothing_images(1)[0]

    def one(_: int) -> object:
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                return post(client, image).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        wait_until(lambda: server.metric("imgserve_queue_depth") >= 8, 60, "8 rows queued")
        server.proc.send_signal(signal.SIGTERM)
        queued = server.metric("imgserve_queue_depth")  # the signal is handled on the event loop: after this read
        wait_until(lambda: httpx.get(server.url + "/health/ready").status_code == 503, 30, "readiness 503")
        assert not all(f.done() for f in futures), "readiness turned 503 before the drain answered the queue"
        late = httpx.post(server.url + "/predict", content=image.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert late.status_code == 503 and late.json()["code"] == "draining", late.text
        assert httpx.get(server.url + "/health/live").status_code == 200
        outcomes = [f.result() for f in futures]
    assert server.proc.wait(60) == 0
    # every request queued before the signal was answered; one that came after it got 503; none was lost
    assert set(outcomes) <= {200, 503} and outcomes.count(200) >= queued, (queued, outcomes)
    assert "draining" in server.logs()
    assert one(0) == "ConnectError"


def test_mixed_precision_setting(trained: Trained, tmp_path: Path) -> None:
    """bfloat16 on a CPU that has it (this one), float16 on a GPU: answers stay close to float32's; a CPU
    without 16-bit instructions says the option does nothing and answers exactly as before."""
    server = start_server(trained.store, tmp_path, IMGSERVE_MIXED_PRECISION="true", IMGSERVE_RUNTIME="tensorflow")
    try:
        images = clothing_images(8)
        clf = SavedModelClassifier(trained.store / trained.name / str(trained.version))
        expected = clf.predict(np.stack([load_image(p, trained.height, trained.width) for p in images]))
        device = httpx.get(server.url + "/health/ready").json()["device"]
        exact = device.startswith("CPU") and not cpu_has_bf16()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for path, want in zip(images, expected, strict=True):
                top = post(client, path, top_k=len(trained.labels)).json()["predictions"][0]["top"]
                got = np.zeros(len(trained.labels))
                for t in top:
                    got[t["index"]] = t["score"]
                np.testing.assert_allclose(got, want, atol=1e-5 if exact else 0.05)
        if exact:
            assert "it has no effect" in server.logs()
        else:
            assert "mixed precision: " + ("float16" if device.startswith("GPU") else "bfloat16") in device
    finally:
        server.stop()


def test_warmup_runs_the_batches_in_flight_at_once(trained: Trained) -> None:
    clf = SavedModelClassifier(trained.store / trained.name / str(trained.version))
    calls: list[tuple[int, str]] = []
    predict = clf.predict

    def recording(x: np.ndarray) -> np.ndarray:
        calls.append((len(x), threading.current_thread().name))
        return predict(x)

    clf.predict = recording  # type: ignore[method-assign]
    warmup(clf, [1, 4], in_flight=2)
    assert sorted(n for n, _ in calls) == [1, 4, 4]  # the largest size twice, not a third time alone
    assert len({t for n, t in calls if n == 4}) == 2  # on two threads
    calls.clear()
    warmup(clf, [1, 4])
    assert [n for n, _ in calls] == [1, 4]
