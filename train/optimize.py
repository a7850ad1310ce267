"""Optimized variants of a published SavedModel: an OpenVINO IR (served in float32, and in bfloat16 on
CPUs that have it) and an int8 IR from NNCF post-training quantization. Each is evaluated on the
version's test split against the SavedModel, and the result goes into model.json and the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import service.runtimes  # noqa: F401 - first: it turns OpenVINO's and NNCF's telemetry off
from service.cpu import cpu_has_bf16
from service.metadata import ModelMeta, Variant, VariantEval
from train import report, stopping

logger = logging.getLogger(__name__)

FP32_PATH = "variants/openvino-fp32/model.xml"
INT8_PATH = "variants/openvino-int8/model.xml"


def images_per_s(predict: Callable[[np.ndarray], np.ndarray], size: tuple[int, int], batch: int = 8,
                 seconds: float = 2.0) -> float:
    """In-process throughput at one batch size, after one untimed call."""
    x = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    predict(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        predict(x)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def predict_all(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
        stopping.check()
        out.append(predict(x[i : i + batch]))
    return np.concatenate(out)


def evaluate(probs: np.ndarray, reference: np.ndarray, y: np.ndarray, labels: list[str], speed: float) -> VariantEval:
    ref_acc = float(np.mean(reference.argmax(axis=1) == y))
    m = report.classification_metrics(y, probs.argmax(axis=1), labels)
    return VariantEval(accuracy=m["accuracy"], macro_f1=m["macro_f1"], accuracy_drop=ref_acc - m["accuracy"],
                       top1_agreement=float(np.mean(probs.argmax(axis=1) == reference.argmax(axis=1))),
                       max_probability_change=float(np.abs(probs - reference).max()), images_per_s=speed,
                       test_images=len(y))


def write_ir(version_dir: Path, calibration: np.ndarray) -> None:
    """The float32 IR and the NNCF int8 IR of the SavedModel in `version_dir`."""
    import nncf
    import openvino as ov

    t = time.perf_counter()
    model = ov.convert_model(str(version_dir))
    (version_dir / FP32_PATH).parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, version_dir / FP32_PATH, compress_to_fp16=False)
    items = [calibration[i : i + 1] for i in range(len(calibration))]
    quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
    (version_dir / INT8_PATH).parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, version_dir / INT8_PATH, compress_to_fp16=False)
    logger.info("OpenVINO IR and NNCF int8 IR written in %.1fs (calibrated on %d images)", time.perf_counter() - t,
                len(calibration))


def make_variants(version_dir: Path, meta: ModelMeta, calibration: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray, reference: np.ndarray | None = None) -> tuple[list[Variant], dict[str, Any]]:
    """Write and evaluate the variants; returns them and the SavedModel's own figures for comparison.
    `x_test` may be any sliceable sequence of images (decoded a batch at a time); `reference`: the
    exported model's answers on it when the caller has them already."""
    from service.runtimes.openvino import OpenVINORuntime
    from service.runtimes.tensorflow import SavedModelRuntime
    from service.store import savedmodel_digest

    write_ir(version_dir, calibration)
    digest = savedmodel_digest(version_dir)
    size = (meta.input.height, meta.input.width)
    saved = SavedModelRuntime(version_dir, meta)
    if reference is None:
        reference = predict_all(saved.predict, x_test)
    baseline = {"runtime": "tensorflow", "precision": "fp32", "accuracy": float(np.mean(reference.argmax(1) == y_test)),
                "images_per_s": images_per_s(saved.predict, size)}
    candidates = [Variant(runtime="openvino", precision="fp32", path=FP32_PATH, source_sha256=digest),
                  Variant(runtime="openvino", precision="int8", path=INT8_PATH, source_sha256=digest)]
    if cpu_has_bf16():
        candidates.insert(1, Variant(runtime="openvino", precision="bf16", path=FP32_PATH, source_sha256=digest))
    variants = []
    for v in candidates:
        rt = OpenVINORuntime(version_dir, meta, v)
        probs = predict_all(rt.predict, x_test)
        v = v.model_copy(update={"evaluation": evaluate(probs, reference, y_test, meta.labels,
                                                        images_per_s(rt.predict, size))})
        e = v.evaluation
        assert e is not None
        logger.info("variant %s: accuracy %.3f (drop %+.2f points), top-1 agreement %.3f, largest probability "
                    "change %.3f, %.1f images/s (SavedModel %.1f)", v.key, e.accuracy, e.accuracy_drop * 100,
                    e.top1_agreement, e.max_probability_change, e.images_per_s, baseline["images_per_s"])
        variants.append(v)
    return variants, baseline


def variant_metadata(version_dir: Path, meta: ModelMeta, x_train: np.ndarray, x_test: np.ndarray,
                     y_test: np.ndarray, calibration_images: int, seed: int,
                     reference: np.ndarray | None = None) -> tuple[dict[str, Any], list[str]]:
    """Make and evaluate the variants (calibrated on a seeded sample of `x_train`): what goes into
    model.json, and the report's lines about them."""
    pick = np.sort(np.random.default_rng(seed).permutation(len(x_train))[:calibration_images])
    variants, baseline = make_variants(version_dir, meta, x_train[pick], x_test, y_test, reference)
    measured = {"variants": [v.model_dump(mode="json", exclude_none=True) for v in variants],
                "metrics": {**meta.metrics, "images_per_s": baseline["images_per_s"]}}
    return measured, report_lines(variants, baseline)


def report_lines(variants: list[Variant], baseline: dict[str, Any]) -> list[str]:
    """The variants table of report.md."""
    lines = ["## Optimized variants", "",
             "Evaluated on the test split against the SavedModel; images/s in process at batch 8 on the "
             "machine that trained it.", "",
             "| runtime | precision | accuracy | drop (points) | macro F1 | top-1 agreement | largest prob. change "
             "| images/s |", "|---|---|---|---|---|---|---|---|",
             f"| tensorflow (SavedModel) | fp32 | {baseline['accuracy']:.3f} | 0 | | 1 | 0 | "
             f"{baseline['images_per_s']:.1f} |"]
    for v in variants:
        e = v.evaluation
        if e is not None:
            lines.append(f"| {v.runtime} | {v.precision} | {e.accuracy:.3f} | {e.accuracy_drop * 100:+.2f} | "
                         f"{e.macro_f1:.3f} | {e.top1_agreement:.3f} | {e.max_probability_change:.4f} | "
                         f"{e.images_per_s:.1f} |")
    return [*lines, ""]


def optimize_published(store_dir: Path, name: str, version: int | None, data: Path | None,
                       calibration_images: int = 300, workers: int = 4) -> Path:
    """Publish a new version: a copy of `version` (default: the latest) with variants evaluated on the
    same test split its training used (the split is seeded, so it is found again)."""
    import shutil

    from service import store
    from train.config import TrainConfig
    from train.splits import find_splits, load_data

    versions = store.list_versions(store_dir, name)
    if not versions:
        raise ValueError(f"model {name!r} has no version in {store_dir}")
    src = store.version_dir(store_dir, name, version or versions[-1])
    meta = store.read_metadata(src, name=name)
    source = data or Path(str(meta.dataset.get("source", "")))
    cfg = TrainConfig(data=source, image_size=meta.input.height, seed=int(meta.training.get("seed", 1337)),
                      max_per_class=meta.training.get("max_per_class"), workers=workers)
    split = load_data(cfg, find_splits(cfg)[0])
    if meta.dataset.get("content_sha256") not in (None, split.content_hash):
        logger.warning("the dataset in %s differs from the one %s version %d was trained on: its test split "
                       "may differ too", source, name, meta.version)
    def write(tmp: Path) -> dict[str, Any]:
        def skip(folder: str, names: list[str]) -> list[str]:
            return [n for n in names if Path(folder) == src and n in ("model.json", "variants")]

        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=skip)
        assert split.x_tr is not None and split.x_te is not None and split.y_te is not None, "decoded up front"
        measured, lines = variant_metadata(tmp, meta, split.x_tr, split.x_te, split.y_te, calibration_images,
                                           cfg.seed)
        report_md = tmp / "report" / "report.md"
        if report_md.parent.is_dir():
            with report_md.open("a", encoding="utf-8") as fh:
                fh.write("\n" + "\n".join(lines))
        return {**measured, "optimized_from": meta.version}

    doc = meta.document()
    doc.pop("variants", None)
    return store.publish(store_dir, name, write, doc)
