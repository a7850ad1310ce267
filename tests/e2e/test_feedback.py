"""Feedback on a real server (one process, and two behind one port): by upload and by a recent prediction's
request id, stored where `python -m train --extra-data` reads it; every bad request gets its 4xx and
writes nothing; the feedback key may send feedback and nothing else; the request log has a line per
answer; the answer metrics count what was answered."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer, Trained, clothing_images, grpc_infer, metric_sum, start_server
from train.pipeline import TrainConfig, run

pytestmark = pytest.mark.slow
SERVER_PROCESSES = ["1", "2"]  # a request id kept by one process is found by the other; see conftest.py
KEY, FEEDBACK_KEY, ADMIN = "pred-k3y-1c", "feedb4ck-k3y-2d", "adm1n-k3y-3e"
AUTH = {"Authorization": f"Bearer {KEY}"}
FB_AUTH = {"X-API-Key": FEEDBACK_KEY}


@pytest.fixture(scope="module")
def server(trained: Trained, tmp_path_factory: pytest.TempPathFactory, server_processes: int) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("feedback")
    shutil.copytree(trained.store, tmp / "store")
    s = start_server(tmp / "store", tmp, IMGSERVE_FEEDBACK_DIR=str(tmp / "feedback"), IMGSERVE_RECENT_IMAGES_MB="1",
                     IMGSERVE_REQUEST_LOG=str(tmp / "logs" / "requests.log"), IMGSERVE_API_KEY=KEY,
                     IMGSERVE_FEEDBACK_API_KEY=FEEDBACK_KEY, IMGSERVE_ADMIN_API_KEY=ADMIN)
    assert len(s.workers()) == server_processes
    yield s
    s.stop(signal.SIGKILL)


def feedback_dir(server: LiveServer) -> Path:
    return server.log.parent / "feedback"


def stored_files(server: LiveServer) -> dict[str, bytes]:
    root = feedback_dir(server)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/." not in f"/{p.relative_to(root)}" and p.suffix != ".jsonl"}


def upload(server: LiveServer, photo: bytes, label: str, headers: dict[str, str] | None = None,
           **fields: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/feedback", files={"file": ("photo.jpg", photo, "image/jpeg")},
                      data={"label": label, **fields}, headers=FB_AUTH if headers is None else headers,
                      timeout=30)


def test_feedback_by_upload_is_stored_once_in_the_folder_train_reads(server: LiveServer, trained: Trained) -> None:
    photo = clothing_images(3)[2].read_bytes()
    label = trained.labels[1]
    before = server.metric("imgserve_feedback_total", model=trained.name, outcome="stored")
    r = upload(server, photo, label, who="reviewer-7")
    assert r.status_code == 201, r.text
    stored = feedback_dir(server) / r.json()["stored"]
    assert stored.parent == feedback_dir(server) / trained.name / label and stored.read_bytes() == photo
    assert server.metric("imgserve_feedback_total", model=trained.name, outcome="stored") == before + 1
    again = upload(server, photo, label, headers=AUTH)  # the API key may send feedback too
    assert again.status_code == 200 and again.json()["created"] is False and again.json()["stored"] == r.json()["stored"]
    other = upload(server, photo, trained.labels[0])
    assert other.status_code == 409 and f"already labelled '{label}'" in other.json()["error"]
    lines = [json.loads(x) for x in (feedback_dir(server) / trained.name / "feedback.jsonl").read_text().splitlines()]
    assert [x["who"] for x in lines if x["sha256"] == r.json()["sha256"]] == ["reviewer-7"]


def test_feedback_by_request_id_stores_the_image_that_request_sent(server: LiveServer, trained: Trained) -> None:
    photos = clothing_images(16)[4:]
    for first, second in zip(photos[::2], photos[1::2], strict=True):  # several: both processes answer some
        r = httpx.post(server.url + "/predict", headers=AUTH, timeout=30,
                       files=[("file", ("a.jpg", first.read_bytes(), "image/jpeg")),
                              ("file", ("b.jpg", second.read_bytes(), "image/jpeg"))])
        assert r.status_code == 200
        predicted = r.json()["predictions"][1]["top"][0]["label"]
        fb = httpx.post(server.url + "/v1/feedback", headers=FB_AUTH, timeout=30,
                        json={"request_id": r.headers["x-request-id"], "label": second.parent.name, "index": 1})
        assert fb.status_code in (200, 201), fb.text  # 200: a photo stored by an earlier test
        stored = feedback_dir(server) / fb.json()["stored"]
        assert stored.read_bytes() == second.read_bytes() and stored.parent.name == second.parent.name
        if fb.status_code == 201:
            line = json.loads((feedback_dir(server) / trained.name / "feedback.jsonl").read_text().splitlines()[-1])
            assert line["predicted"] == predicted and line["model_version"] == trained.version


def test_a_grpc_calls_own_request_id_names_it_for_feedback_and_in_the_request_log(server: LiveServer,
                                                                                    trained: Trained) -> None:
    """A ModelInfer call that sends no x-request-id gets one in its trailers (as REST gets X-Request-ID); that id
    is the one the recent-images buffer and the request log keep, so feedback can name it."""
    photos = clothing_images(20)[16:]
    seen = set()
    for photo in photos:  # several: both processes answer some
        _, trailers = grpc_infer(server.grpc_target, trained.name, [photo.read_bytes()], authorization=f"Bearer {KEY}")
        request_id = trailers["x-request-id"]
        assert len(request_id) == 32 and request_id not in seen
        seen.add(request_id)
        fb = httpx.post(server.url + "/v1/feedback", headers=FB_AUTH, timeout=30,
                        json={"request_id": request_id, "label": photo.parent.name})
        assert fb.status_code in (200, 201), fb.text
        assert (feedback_dir(server) / fb.json()["stored"]).read_bytes() == photo.read_bytes()
    logs = sorted((server.log.parent / "logs").glob("requests*.log"))
    lines = {d["request_id"]: d for p in logs for d in map(json.loads, p.read_text().splitlines())}
    assert all(lines[i]["protocol"] == "grpc" and lines[i]["model"] == trained.name for i in seen)


@pytest.mark.parametrize(("case", "status", "message"), [
    ("label not a class", 400, "is not a class of"),
    ("no label", 400, "'label' is missing"),
    ("undecodable image", 400, "corrupt or truncated"),
    ("not an image", 415, "not an image in a supported format"),
    ("expired request id", 404, "not among the recent predictions"),
    ("image index out of range", 400, "had 1 image(s)"),
    ("unknown JSON field", 400, "Extra inputs are not permitted"),
    ("two photos", 400, "exactly one photo"),
    ("text body", 415, "is not accepted"),
    ("no key", 401, "feedback key"),
])
def test_bad_feedback_gets_its_status_and_stores_nothing(server: LiveServer, trained: Trained, case: str,
                                                         status: int, message: str) -> None:
    photo = clothing_images(20)[19].read_bytes()
    before = stored_files(server)
    url = server.url + "/v1/feedback"
    label = trained.labels[0]
    if case == "label not a class":
        r = upload(server, photo, "giraffe")
    elif case == "no label":
        r = upload(server, photo, " ")
    elif case == "undecodable image":
        r = upload(server, photo[: len(photo) // 3], label)
    elif case == "not an image":
        r = upload(server, b"%PDF-1.4 not a photo", label)
    elif case == "expired request id":
        r = httpx.post(url, headers=FB_AUTH, json={"request_id": "never-seen-0001", "label": label})
    elif case == "image index out of range":
        p = httpx.post(server.url + "/predict", headers={**AUTH, "Content-Type": "image/jpeg"}, content=photo)
        r = httpx.post(url, headers=FB_AUTH, json={"request_id": p.headers["x-request-id"], "label": label, "index": 1})
    elif case == "unknown JSON field":
        r = httpx.post(url, headers=FB_AUTH, json={"request_id": "x", "label": label, "colour": "red"})
    elif case == "two photos":
        r = httpx.post(url, headers=FB_AUTH, data={"label": label},
                       files=[("file", ("a.jpg", photo, "image/jpeg")), ("file", ("b.jpg", photo, "image/jpeg"))])
    elif case == "text body":
        r = httpx.post(url, headers={**FB_AUTH, "Content-Type": "text/plain"}, content=b"shoes")
    else:
        r = upload(server, photo, label, headers={})
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()
    assert stored_files(server) == before
    assert httpx.get(server.url + "/health/live").status_code == 200


def test_a_feedback_folder_that_cannot_be_written_gets_503_and_the_server_goes_on(server: LiveServer,
                                                                                  trained: Trained) -> None:
    """The model's folder is a file (as a full or read-only disk would, the write fails): 503 saying so, nothing
    stored, predictions unaffected; once the folder is back, feedback is stored again."""
    folder = feedback_dir(server) / trained.name
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder.with_name(".kept")
    folder.rename(kept)
    folder.write_text("not a folder")
    photo = clothing_images(21)[20].read_bytes()
    try:
        r = upload(server, photo, trained.labels[0])
        assert r.status_code == 503 and "cannot be written" in r.json()["error"], r.text
        assert folder.read_text() == "not a folder"
        p = httpx.post(server.url + "/predict", headers={**AUTH, "Content-Type": "image/jpeg"}, content=photo)
        assert p.status_code == 200
    finally:
        folder.unlink()
        kept.rename(folder)
    assert upload(server, photo, trained.labels[0]).status_code in (200, 201)


def test_the_feedback_key_may_send_feedback_and_nothing_else(server: LiveServer, trained: Trained) -> None:
    photo = clothing_images(1)[0].read_bytes()
    r = httpx.post(server.url + "/predict", headers={**FB_AUTH, "Content-Type": "image/jpeg"}, content=photo)
    assert r.status_code == 401
    r = httpx.post(server.url + f"/v2/repository/models/{trained.name}/unload", headers=FB_AUTH)
    assert r.status_code == 401


def test_the_request_log_has_a_line_per_answer_and_no_image(server: LiveServer, trained: Trained) -> None:
    ids = []
    for photo in clothing_images(6):
        r = httpx.post(server.url + "/predict", headers={**AUTH, "Content-Type": "image/jpeg"},
                       content=photo.read_bytes())
        ids.append((r.headers["x-request-id"], r.json()["predictions"][0]["top"][0]["label"]))
    logs = sorted((server.log.parent / "logs").glob("requests*.log"))
    assert logs and all(".log" in p.name for p in logs)
    lines = {d["request_id"]: d for p in logs for d in map(json.loads, p.read_text().splitlines())}
    for request_id, label in ids:
        line = lines[request_id]
        assert line["model"] == trained.name and line["version"] == trained.version and line["protocol"] == "http"
        assert line["top"][0][0]["label"] == label and line["latency_ms"] > 0 and "image_b64" not in line


def test_answer_metrics_count_every_image(server: LiveServer, trained: Trained) -> None:
    text = server.metrics()
    before = metric_sum(text, "imgserve_predicted_class_total", model=trained.name)
    top_before = metric_sum(text, "imgserve_top_probability_count", model=trained.name)
    r = httpx.post(server.url + "/predict", headers=AUTH, timeout=30,
                   files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in clothing_images(5)])
    assert r.status_code == 200
    counted = {top[0]["label"] for top in (p["top"] for p in r.json()["predictions"])}
    text = server.metrics()
    assert metric_sum(text, "imgserve_predicted_class_total", model=trained.name) == before + 5
    assert metric_sum(text, "imgserve_top_probability_count", model=trained.name) == top_before + 5
    assert all(metric_sum(text, "imgserve_predicted_class_total", model=trained.name, label=c) >= 1 for c in counted)


@pytest.mark.server_processes("1")  # a training run: the server's process count changes nothing in it
def test_train_reads_the_feedback_folder_into_the_training_split_only(server: LiveServer, trained: Trained,
                                                                      clothing: Path, tmp_path: Path) -> None:
    """Feedback sent here, then `train --extra-data FEEDBACK/<model>`: the report counts it per class, scores it
    against the version before, and a photo that is in the test split is left out of training."""
    in_test = trained.test_paths[0]
    test_split = set(trained.test_paths)
    not_held_out = [p for p in sorted((clothing / "train" / trained.labels[2]).glob("*.jpg")) if p not in test_split]
    for photo in [in_test, *not_held_out[:3]]:
        r = upload(server, photo.read_bytes(), photo.parent.name)
        assert r.status_code in (200, 201), r.text
    folder = feedback_dir(server) / trained.name
    counts = {d.name: len(list(d.glob("*.*"))) for d in folder.iterdir() if d.is_dir() and d.name[0] != "."}
    store = tmp_path / "store"
    shutil.copytree(trained.store, store)
    result = run(TrainConfig(data=clothing, store=store, name=trained.name, backbone="cnn", weights="none",
                             image_size=48, max_per_class=6, head_epochs=2, batch_size=16, workers=2, variants=False,
                             extra_data=folder))
    fb = result.metrics["feedback"]
    assert fb["left_out_in_held_out_splits"] >= 1
    assert sum(fb["per_class"].values()) == fb["photos"] == sum(counts.values()) - fb["left_out_in_held_out_splits"]
    assert fb["baseline_version"] == trained.version and 0 <= fb["baseline_accuracy"] <= 1
    meta = json.loads((result.version_dir / "model.json").read_text())
    assert meta["dataset"]["extra"]["per_class"] == fb["per_class"]
    assert meta["dataset"]["class_counts"]["test"] == json.loads(
        (trained.store / trained.name / str(trained.version) / "model.json").read_text())["dataset"]["class_counts"]["test"]
    assert "Extra photos (feedback) in the training split only" in (result.version_dir / "report" / "report.md").read_text()
