"""OpenVINO variants of a real model trained in CI: they answer like the SavedModel, a broken one never
takes its version down, a hot swap between an int8 version and a SavedModel-only one loses nothing,
and `python -m train optimize` publishes a new version with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from service import store
from service.imaging import load_image
from service.runtimes.openvino import OpenVINORuntime
from service.runtimes.tensorflow import SavedModelRuntime
from tests.support import (
    REPO,
    Load,
    Trained,
    clone_version,
    clothing_images,
    served_everywhere,
    served_runtime,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.slow
# Largest change of a class probability against the SavedModel, per precision (the float32 IR is the
# same arithmetic; bfloat16 keeps 8 bits of mantissa; int8 is calibrated on 60 training images here).
TOLERANCE = {"fp32": 1e-4, "bf16": 0.03, "int8": 0.05}


def test_every_variant_answers_like_the_savedmodel(trained: Trained) -> None:
    path = trained.store / trained.name / str(trained.version)
    meta = store.read_metadata(path)
    assert {v.precision for v in meta.variants} >= {"fp32", "int8"}
    images = np.stack([load_image(p, trained.height, trained.width) for p in clothing_images(30)])
    want = SavedModelRuntime(path, meta).predict(images)
    test_x, test_y = trained.test_split()
    assert abs(meta.metrics["accuracy"] - float((SavedModelRuntime(path, meta).predict(test_x).argmax(1) == test_y)
                                                .mean())) <= 1 / len(test_y) + 1e-9
    for v in meta.variants:
        got = OpenVINORuntime(path, meta, v).predict(images)
        assert np.abs(got - want).max() <= TOLERANCE[v.precision], v.key
        # top-1 agrees wherever the SavedModel's answer is decisive (the small test model is often near a
        # tie, where a change within the tolerance may swap the first two classes: seen with int8 on AVX2)
        top2 = np.sort(want, axis=1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * TOLERANCE[v.precision]
        assert np.all(got.argmax(1)[decisive] == want.argmax(1)[decisive]), v.key
        ev = v.evaluation
        assert ev is not None and ev.test_images and ev.images_per_s and ev.images_per_s > 0
        # the published accuracy is what the variant scores on the version's test split, computed again here
        assert ev.test_images == len(test_x)
        recomputed = float((OpenVINORuntime(path, meta, v).predict(test_x).argmax(1) == test_y).mean())
        assert abs(ev.accuracy - recomputed) <= 1 / ev.test_images + 1e-9, (v.key, ev.accuracy, recomputed)
        # measured against the SavedModel on the same split (Keras' own evaluation may differ by a tie)
        assert abs(ev.accuracy_drop - (meta.metrics["accuracy"] - ev.accuracy)) <= 1 / ev.test_images + 1e-9
    report = (path / "report" / "report.md").read_text()
    assert "## Optimized variants" in report and "| openvino | int8 |" in report


def test_corrupt_variant_is_refused_and_the_savedmodel_serves(trained: Trained, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(trained.store, root)
    vdir = root / trained.name / str(trained.version)
    (vdir / "variants" / "openvino-int8" / "model.xml").write_text("<net><not-a-model")
    server = start_server(root, tmp_path, IMGSERVE_PRECISION="int8", IMGSERVE_MAX_ACCURACY_DROP="100")
    try:
        ready = httpx.get(server.url + "/health/ready").json()
        assert ready["runtimes"][trained.name] == {"runtime": "tensorflow", "precision": "fp32"}
        assert "refusing variant openvino-int8" in server.logs()
        image = clothing_images(1)[0]
        r = httpx.post(server.url + "/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.headers["x-model-runtime"] == "tensorflow/fp32"
    finally:
        assert server.stop() == 0


def test_a_savedmodel_only_version_is_converted_by_openvino_and_answers_alike(trained: Trained,
                                                                             tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    shutil.copytree(trained.store / trained.name / str(trained.version), root / trained.name / "1",
                    ignore=shutil.ignore_patterns("variants"))
    vdir = root / trained.name / "1"
    doc = json.loads((vdir / "model.json").read_text())
    doc.update(version=1, variants=[])  # as another tool, or `--variants no`, publishes it
    (vdir / "model.json").write_text(json.dumps(doc))
    images = clothing_images(12)
    want = SavedModelRuntime(vdir, store.read_metadata(vdir)).predict(
        np.stack([load_image(p, trained.height, trained.width) for p in images]))
    for convert, runtime in (("true", "openvino/fp32"), ("false", "tensorflow/fp32")):
        server = start_server(root, tmp_path, IMGSERVE_CONVERT_SAVEDMODEL=convert, IMGSERVE_LOG_LEVEL="INFO")
        try:
            got = []
            for image in images:
                r = httpx.post(server.url + "/predict?top_k=10",
                               files={"file": (image.name, image.read_bytes(), "image/jpeg")})
                assert r.status_code == 200 and r.headers["x-model-runtime"] == runtime, r.text
                scores = {t["index"]: t["score"] for t in r.json()["predictions"][0]["top"]}
                got.append([scores[i] for i in range(len(scores))])
            logs = server.logs()
        finally:
            assert server.stop() == 0
        assert np.abs(np.array(got) - want).max() <= TOLERANCE["fp32"] + 1e-6, runtime  # scores are rounded
        assert ("its SavedModel converted by OpenVINO" in logs) == (convert == "true")


def test_hot_swap_to_and_from_int8_under_load(trained: Trained, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(trained.store, root)
    v1 = trained.version
    server = start_server(root, tmp_path, IMGSERVE_PRECISION="int8", IMGSERVE_MAX_ACCURACY_DROP="100")
    runtimes: dict[int, set[str]] = {}
    try:
        assert httpx.get(server.url + "/health/ready").json()["runtimes"][trained.name]["precision"] == "int8"
        with Load(server.url, clothing_images(10)) as load:
            assert wait_until(lambda: len(load.results) > 10)
            clone_version(root, trained.name, v1, v1 + 1, {"variants": []})  # SavedModel only
            assert wait_until(lambda: any(v == v1 + 1 for _, v, _ in load.results[-5:]))
            clone_version(root, trained.name, v1, v1 + 2)  # int8 again
            assert wait_until(lambda: any(v == v1 + 2 for _, v, _ in load.results[-5:]))
            assert wait_until(lambda: served_everywhere(server, trained.name) == {v1 + 2}, 60)
            n = len(load.results)
            assert wait_until(lambda: len(load.results) > n + 10)
        for v in (v1, v1 + 1, v1 + 2):
            meta = httpx.get(server.url + f"/v2/models/{trained.name}/versions/{v}")
            if meta.status_code == 200:
                runtimes[v] = {meta.json()["parameters"]["precision"]}
    finally:
        assert server.stop() == 0
    assert load.errors == [] and {s for s, _, _ in load.results} == {200}
    assert {v for _, v, _ in load.results} == {v1, v1 + 1, v1 + 2}
    assert runtimes == {v1 + 2: {"int8"}}  # only the newest is loaded at the end
    logs = server.logs()
    assert f"version {v1 + 1} (10 classes, input 48x48, runtime tensorflow fp32)" in logs
    assert f"version {v1 + 2} (10 classes, input 48x48, runtime openvino int8)" in logs


def test_train_optimize_publishes_a_new_version_with_variants(trained: Trained, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(trained.store, root)
    src = root / trained.name / str(trained.version)
    shutil.rmtree(src / "variants")
    doc = json.loads((src / "model.json").read_text())
    doc["variants"] = []
    (src / "model.json").write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-m", "train", "optimize", "--store", str(root), "--name", trained.name,
                        "--calibration-images", "20", "--workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    new = root / trained.name / str(trained.version + 1)
    meta = store.read_metadata(new)
    assert meta.optimized_from == trained.version  # type: ignore[attr-defined]
    assert {v.precision for v in meta.variants} >= {"fp32", "int8"}
    assert all((new / v.path).is_file() for v in meta.variants)
    assert not (src / "variants").exists()  # the old version is untouched
    # the same seeded test split was found again: the SavedModel's accuracy on it is the recorded one
    assert all(v.evaluation and v.evaluation.test_images == meta.metrics["test_images"] for v in meta.variants)


def test_a_short_model_call_runs_on_one_openvino_thread(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left to choose, OpenVINO would run a small model on every core, no faster, and its idle threads would
    spin between calls; a costly model keeps them. Short and costly are set by the threshold here, not by
    how fast this machine happens to be at the moment (a loaded machine makes any model slow)."""
    from service.runtimes import openvino

    path = trained.store / trained.name / str(trained.version)
    meta = store.read_metadata(path)
    variant = next(v for v in meta.variants if v.precision == "fp32")
    monkeypatch.setattr(openvino, "ONE_THREAD_BELOW_S", 3600.0)  # every model counts as short
    assert OpenVINORuntime(path, meta, variant).threads == 1
    assert OpenVINORuntime.converted(path, meta).threads == 1
    assert OpenVINORuntime(path, meta, variant, threads=2).threads == 2  # a setting is kept as it is
    monkeypatch.setattr(openvino, "ONE_THREAD_BELOW_S", 0.0)  # every model counts as costly
    assert OpenVINORuntime.converted(path, meta).threads == 0
    assert OpenVINORuntime(path, meta, variant).threads == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_the_intra_op_threads_setting_reaches_openvino(trained: Trained, threads: int) -> None:
    """IMGSERVE_INTRA_OP_THREADS is the thread count OpenVINO compiles the variant with."""
    runtime = served_runtime(trained, intra_op_threads=threads, runtime="openvino")
    assert runtime.runtime == "openvino"
    assert runtime._compiled.get_property("INFERENCE_NUM_THREADS") == threads
