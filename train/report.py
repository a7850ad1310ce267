"""Evaluation metrics and the plots and Markdown written into a version's `report/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1 and the confusion matrix (rows: true, cols: predicted)."""
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(axis=0).astype(float), cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = actual > 0
    return {
        "test_images": int(cm.sum()),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(actual[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
    }


def plot_history(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Loss and accuracy per epoch for each phase, phases laid end to end."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for phase, hist in histories.items():
        n = len(hist.get("loss", []))
        if n == 0:
            continue
        epochs = np.arange(offset + 1, offset + n + 1)
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            ax.plot(epochs, hist.get(key, []), marker=".", label=f"{phase} train")
            if f"val_{key}" in hist:
                ax.plot(epochs, hist[f"val_{key}"], marker=".", linestyle="--", label=f"{phase} validation")
        offset += n
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm: list[list[int]], labels: list[str], path: Path) -> None:
    arr = np.asarray(cm)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(arr, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    limit = arr.max() / 2 if arr.size else 0
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, str(arr[i, j]), ha="center", va="center",
                    color="white" if arr[i, j] > limit else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], path: Path,
                 count: int = 16) -> None:
    n = min(count, len(images))
    cols = 4
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            ok = y_true[i] == y_pred[i]
            ax.set_title(f"true: {labels[y_true[i]]}\npred: {labels[y_pred[i]]}", fontsize=8,
                         color="green" if ok else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(folder: Path, summary: dict[str, Any]) -> None:
    """metrics.json and report.md (the plots are written beside them by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in summary.items() if k != "markdown"}
    (folder / "metrics.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    m = summary["metrics"]
    lines = [
        f"# {summary['name']}: training report",
        "",
        f"Backbone `{summary['backbone']}`, weights `{summary['weights']}`, input "
        f"{summary['input']['height']}x{summary['input']['width']}, {len(summary['labels'])} classes.",
        "",
        f"Test split: {m['test_images']} images. Accuracy **{m['accuracy']:.3f}**, macro precision "
        f"{m['macro_precision']:.3f}, macro recall {m['macro_recall']:.3f}, macro F1 **{m['macro_f1']:.3f}**.",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for label, row in m["per_class"].items():
        lines.append(f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    lines += [
        "",
        f"Skipped files (could not be decoded): {len(summary['skipped_files'])}.",
        "",
        "Phase wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings_s"].items()) + ".",
        "",
        "![training curves](history.png)",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "![sample predictions](samples.png)",
        "",
        *summary.get("markdown", []),
    ]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")
