"""Which runtime serves a version: the variant choice against the accuracy budget and the settings, and a
SavedModel's conversion by OpenVINO only when it answers like TensorFlow."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.metadata import ModelMeta, Variant, VariantEval
from service.runtimes import choose, converted
from service.settings import Settings


def variant(precision: str, drop_points: float | None, speed: float) -> Variant:
    ev = None if drop_points is None else VariantEval(accuracy=0.8, accuracy_drop=drop_points / 100,
                                                      images_per_s=speed)
    return Variant(runtime="openvino", precision=precision, path=f"variants/{precision}/model.xml", evaluation=ev)


META = ModelMeta.create(labels=["a", "b"], size=(8, 8), backbone="cnn", variants=[
    variant("fp32", 0.0, 15.0), variant("bf16", 0.3, 30.0), variant("int8", 0.6, 60.0)])


def keys(settings: Settings, *, gpu: bool = False, bf16: bool = True, meta: ModelMeta = META) -> list[str]:
    return [v.key for v in choose(meta, settings, gpu=gpu, bf16=bf16)]


def test_auto_serves_the_fastest_variant_within_the_budget() -> None:
    assert keys(Settings()) == ["openvino-int8", "openvino-bf16", "openvino-fp32"]
    assert keys(Settings(max_accuracy_drop=0.5)) == ["openvino-bf16", "openvino-fp32"]


def test_a_budget_of_zero_gives_float32_only() -> None:
    assert keys(Settings(max_accuracy_drop=0)) == ["openvino-fp32"]
    lossless_int8 = ModelMeta.create(labels=["a", "b"], size=(8, 8), backbone="cnn",
                                     variants=[variant("int8", 0.0, 60.0)])
    assert keys(Settings(max_accuracy_drop=0), meta=lossless_int8) == []  # the SavedModel (float32)


def test_a_variant_over_budget_or_unmeasured_is_never_picked() -> None:
    meta = ModelMeta.create(labels=["a", "b"], size=(8, 8), backbone="cnn",
                            variants=[variant("int8", 5.0, 60.0), variant("bf16", None, 30.0)])
    assert keys(Settings(), meta=meta) == []
    assert keys(Settings(precision="int8"), meta=meta) == []
    assert keys(Settings(max_accuracy_drop=6), meta=meta) == ["openvino-int8"]


@pytest.mark.parametrize(("settings", "kw", "want"), [
    ({"precision": "bf16"}, {}, ["openvino-bf16"]),
    ({"precision": "fp32"}, {}, ["openvino-fp32"]),
    ({"runtime": "tensorflow"}, {}, []),
    ({}, {"gpu": True}, []),  # GPUs run the SavedModel (float16 with IMGSERVE_MIXED_PRECISION)
    ({}, {"bf16": False}, ["openvino-int8", "openvino-fp32"]),  # no bfloat16 instructions on this CPU
])
def test_settings_and_hardware_narrow_the_choice(settings: dict[str, object], kw: dict[str, bool],
                                                 want: list[str]) -> None:
    assert keys(Settings(**settings), **kw) == want


def test_variant_paths_stay_inside_the_version() -> None:
    for bad in ("/etc/passwd", "../other/model.xml", "variants/../../x.xml"):
        with pytest.raises(ValueError, match="inside"):
            Variant(runtime="openvino", precision="int8", path=bad)


class Answers:
    """A runtime answering fixed probabilities, whatever the images."""

    runtime, precision = "fake", "fp32"

    def __init__(self, probs: np.ndarray | Exception) -> None:
        self.probs, self.meta = probs, META

    def predict(self, images: np.ndarray) -> np.ndarray:
        if isinstance(self.probs, Exception):
            raise self.probs
        return np.repeat(self.probs[None], len(images), axis=0)


@pytest.mark.parametrize(("theirs", "served"), [
    (np.array([0.7, 0.3]), "converted"),
    (np.array([0.7 + 5e-4, 0.3 - 5e-4]), "converted"),  # within the tolerance (float32 kernels differ)
    (np.array([0.69, 0.31]), None),  # not: TensorFlow serves
    (np.array([np.nan, 0.3]), None),
    (RuntimeError("OpenVINO: unsupported op"), None),
])
def test_a_conversion_serves_only_when_it_answers_like_tensorflow(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, theirs: Any, served: str | None) -> None:
    from service.runtimes import openvino

    ours = Answers(theirs)
    monkeypatch.setattr(openvino.OpenVINORuntime, "converted", classmethod(lambda cls, path, meta, threads: ours))
    with caplog.at_level(logging.INFO, logger="service.runtimes"):
        got = converted(Path("/nowhere"), META, Settings(), Answers(np.array([0.7, 0.3])))
    assert got is (ours if served else None)
    assert ("TensorFlow serves it" in caplog.text) == (served is None)


FORKS = """
import os, sys, time
forks = []
real = os.fork
os.fork = lambda: forks.append(1) or real()
import service.runtimes  # noqa: F401
import openvino
time.sleep(3)  # the event goes out from a thread pool, a moment after the import
print(len(forks), sys.modules.get("openvino_telemetry") is None)
"""


def test_openvino_sends_no_telemetry_and_never_forks_the_server() -> None:
    """`import openvino` reports the import to a third party by forking the process (and
    `ov.convert_model` does so again per conversion), unless telemetry is off: service.runtimes turns
    it off. CI=true would turn it off by itself, so the child runs without it."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    out = subprocess.run([sys.executable, "-c", FORKS], capture_output=True, text=True, env=env,
                         check=True, cwd=Path(__file__).resolve().parents[2], timeout=120).stdout.split()
    assert out == ["0", "True"]


def test_without_tensorflow_a_version_with_no_usable_variant_is_refused_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving image has no TensorFlow: a version is served by a variant or not at all, and says why."""
    from service import runtimes

    monkeypatch.setattr(runtimes, "tensorflow_available", lambda: False)
    monkeypatch.setattr(runtimes, "tensorflow_device", lambda s: pytest.fail("TensorFlow must not be configured"))
    bare = ModelMeta.create(labels=["a", "b"], size=(8, 8), backbone="cnn")
    with pytest.raises(runtimes.ModelLoadError, match="it has no variant, and this installation has no TensorFlow"):
        runtimes.load(tmp_path, bare, Settings())
    with pytest.raises(runtimes.ModelLoadError, match="none of its variants can serve here"):
        runtimes.load(tmp_path, META, Settings())  # its variant files are missing: each refused, then this
    assert "OpenVINO only" in runtimes.configure(Settings())
    with pytest.raises(runtimes.ModelLoadError, match="IMGSERVE_RUNTIME=tensorflow"):
        runtimes.configure(Settings(runtime="tensorflow"))
