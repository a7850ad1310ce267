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


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the top-1 confidence over `bins` equal-width bins, and the bins
    themselves (count, mean confidence, accuracy) for the reliability diagram."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        conf = float(confidence[inside].mean()) if n else None
        acc = float(correct[inside].mean()) if n else None
        if n:
            ece += n / len(y_true) * abs(acc - conf)  # type: ignore[operator]
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n, "confidence": conf,
                     "accuracy": acc})
    return {"ece": float(ece), "bins": rows, "mean_confidence": float(confidence.mean()),
            "accuracy": float(correct.mean())}


def confused_pairs(cm: list[list[int]], labels: list[str], count: int = 3) -> list[dict[str, Any]]:
    """The `count` most frequent (true, predicted) mistakes, with their share of the true class."""
    arr = np.asarray(cm)
    off = [(int(arr[i, j]), i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j and arr[i, j]]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": labels[i], "predicted": labels[j], "count": n, "share_of_true": n / max(int(arr[i].sum()), 1)}
            for n, i, j in off[:count]]


def plot_reliability(cal: dict[str, Any], path: Path) -> None:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with the bin counts."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = [(b["low"] + b["high"]) / 2 for b in cal["bins"]]
    width = cal["bins"][0]["high"] - cal["bins"][0]["low"]
    acc = [b["accuracy"] or 0.0 for b in cal["bins"]]
    ax.bar(centres, acc, width=width * 0.9, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {cal['ece']:.3f})")
    ax.legend(fontsize=8, loc="upper left")
    hist.bar(centres, [b["count"] for b in cal["bins"]], width=width * 0.9, color="tab:gray")
    hist.set_xlabel("top-1 confidence")
    hist.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confused_pairs(pairs: list[dict[str, Any]], images: dict[tuple[str, str], np.ndarray], path: Path) -> None:
    """A row per confused pair: up to four test images of the true class taken for the predicted one."""
    rows = max(1, len(pairs))
    fig, axes = plt.subplots(rows, 4, figsize=(4 * 2.4, rows * 2.8), squeeze=False)
    for r in range(rows):
        for c in range(4):
            axes[r][c].axis("off")
        if r >= len(pairs):
            axes[r][0].set_title("no mistakes", fontsize=8)
            continue
        p = pairs[r]
        shown = images.get((p["true"], p["predicted"]), np.zeros((0,)))
        for c in range(min(4, len(shown))):
            axes[r][c].imshow(shown[c])
        axes[r][0].set_title(f"{p['true']} -> {p['predicted']} ({p['count']}x)", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    lines = [*_accuracy_lines(summary), *_evidence_lines(summary["metrics"]), *_run_lines(summary),
             "", f"Skipped files (could not be decoded): {len(summary['skipped_files'])}.", "",
             "Phase wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings_s"].items()) + ".",
             "", "![training curves](history.png)", "", "![confusion matrix](confusion_matrix.png)", "",
             "![reliability diagram](reliability.png)", "", "![most confused pairs](confused_pairs.png)", "",
             "![sample predictions](samples.png)", "", *summary.get("markdown", [])]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _accuracy_lines(summary: dict[str, Any]) -> list[str]:
    m = summary["metrics"]
    sample = f" (a seeded sample of {m['test_sample_of']})" if m.get("test_sample_of") else ""
    lines = [
        f"# {summary['name']}: training report",
        "",
        f"Backbone `{summary['backbone']}`, weights `{summary['weights']}`, input "
        f"{summary['input']['height']}x{summary['input']['width']}, {len(summary['labels'])} classes.",
        "",
        f"Test split: {m['test_images']} images{sample}. Accuracy **{m['accuracy']:.3f}**, macro precision "
        f"{m['macro_precision']:.3f}, macro recall {m['macro_recall']:.3f}, macro F1 **{m['macro_f1']:.3f}**.",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for label, row in m["per_class"].items():
        lines.append(f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    return lines


def _evidence_lines(m: dict[str, Any]) -> list[str]:
    """The comparison with the version before, the feedback photos, flip TTA and calibration."""
    lines: list[str] = []
    cmp = m.get("comparison")
    if cmp and "baseline_accuracy" in cmp:
        change = (cmp["accuracy"] - cmp["baseline_accuracy"]) * 100
        lines += ["", f"Against version {cmp['baseline_version']} (the one published before), on this run's "
                      f"{cmp['test_images']} test images: {cmp['baseline_accuracy']:.3f} then, {cmp['accuracy']:.3f} "
                      f"now ({change:+.2f} points). The service's gated rollout uses this comparison."]
    elif cmp:
        lines += ["", f"Not compared with the earlier version: {cmp['reason']}."]
    fb = m.get("feedback")
    if fb:
        counts = ", ".join(f"{label} {n}" for label, n in fb["per_class"].items() if n)
        then = (f"; version {fb['baseline_version']} answered {fb['baseline_accuracy']:.3f} of them "
                f"({(fb['accuracy'] - fb['baseline_accuracy']) * 100:+.1f} points)" if "baseline_accuracy" in fb
                else f"; {fb['reason']}" if "reason" in fb else "")
        lines += ["", f"Extra photos (feedback) in the training split only: {fb['photos']} ({counts}); "
                      f"{fb.get('left_out_in_held_out_splits', 0)} left out as they are in the validation or test "
                      f"split. This model answers {fb['accuracy']:.3f} of them right{then}."]
    if "flip_tta_accuracy" in m:
        served = "served" if m.get("flip_tta_served") else "not served; `--flip-tta yes` serves it at twice the cost"
        lines += ["", f"With the mirror image averaged in (flip test-time augmentation, {served}): accuracy "
                      f"{m['flip_tta_accuracy']:.3f}."]
    if "calibration" in m:
        cal = m["calibration"]
        lines += ["", f"Calibration: expected calibration error **{cal['ece']:.3f}** over 10 confidence bins "
                      f"(mean top-1 confidence {cal['mean_confidence']:.3f} against accuracy {cal['accuracy']:.3f})."]
    return lines


def _run_lines(summary: dict[str, Any]) -> list[str]:
    """The confused pairs, the run's time, memory, device and epochs, the plan's cuts and the cache."""
    lines: list[str] = []
    pairs = summary.get("confused_pairs") or []
    if pairs:
        lines += ["", "Most confused (true -> predicted): " + "; ".join(
            f"{p['true']} -> {p['predicted']} {p['count']}x ({100 * p['share_of_true']:.0f}% of {p['true']})"
            for p in pairs) + "."]
    run = summary.get("run") or {}
    if run.get("minutes") is None:
        return lines
    budget = run.get("time_budget_min") or 0
    stopped = run.get("stopped_by_budget") or []
    lines += ["", f"Run: {run['minutes']:.1f} minutes" + (f" (budget {budget:g}" + (
        f"; it ended {', '.join(stopped)} early)" if stopped else ")") if budget else "") +
        f", peak resident memory {run['peak_rss_bytes'] / 2**30:.2f} GiB, {run.get('device')}, "
        f"{run.get('precision')}; epochs {run.get('epochs')}."]
    notes = (run.get("plan") or {}).get("notes") or []
    if notes:
        lines += ["", "Planned up front to fit the budget: " + "; ".join(notes) + "."]
    cache = run.get("cache")
    if cache:
        lines += ["", f"Feature cache: {cache['rows']} rows of {cache['dtype']}, {cache['bytes'] / 2**20:.0f} "
                      f"MiB in {cache['folder']} ({'reused, ' if cache.get('reused') else ''}"
                      f"{'kept' if cache['kept'] else 'removed at the end'})."]
    return lines
