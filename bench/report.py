"""Turn a benchmark run into JSON, a Markdown table with the targets, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    vgg = run["models"].get("vgg16")
    if vgg:
        limit = vgg["limit"]["best_images_per_s"]
        at32 = next((r for r in vgg["service"] if r["clients"] == 32), None)
        if at32:
            ratio = at32["images_per_s"] / limit
            out.append({"target": "VGG16, 32 clients: >= 0.90 of the in-process limit",
                        "measured": f"{at32['images_per_s']:.2f} / {limit:.2f} = {ratio:.3f}", "met": ratio >= 0.90})
            ceiling = run["ceiling"]["vgg16_images_per_s_ceiling"]
            r2 = at32["images_per_s"] / ceiling
            out.append({"target": "VGG16, 32 clients: >= 0.75 of the FLOP ceiling",
                        "measured": f"{at32['images_per_s']:.2f} / {ceiling:.2f} = {r2:.3f}", "met": r2 >= 0.75})
    for kind, entry in run["models"].items():
        one = next((r for r in entry["service"] if r["clients"] == 1), None)
        if one and one.get("p50_ms") is not None:
            bound = entry["limit"]["batch1_latency_ms"] + float(entry["settings"]["IMGSERVE_MAX_BATCH_DELAY_MS"]) + 3
            out.append({"target": f"{kind}, 1 client: p50 <= batch-of-one + delay + 3 ms",
                        "measured": f"{one['p50_ms']:.1f} ms vs {bound:.1f} ms", "met": one["p50_ms"] <= bound})
        last = entry["service"][-1] if entry["service"] else None
        if last and last.get("rss_bytes") and entry.get("rss_after_warmup_bytes"):
            growth = last["rss_bytes"] / entry["rss_after_warmup_bytes"] - 1
            out.append({"target": f"{kind}: resident memory after the run within 10% of after warm-up",
                        "measured": f"{entry['rss_after_warmup_bytes'] / 2**20:.0f} -> "
                                    f"{last['rss_bytes'] / 2**20:.0f} MiB ({growth * 100:+.1f}%)",
                        "met": abs(growth) <= 0.10})
        out.append({"target": f"{kind}: time from start to ready", "measured": f"{entry['startup_s']:.1f} s",
                    "met": None})
    cnn = run["models"].get("cnn")
    if cnn and cnn["baseline"]:
        off = cnn["baseline"]
        on = next((r for r in cnn["service"] if r["clients"] == off["clients"]), None)
        if on:
            ratio = on["images_per_s"] / max(off["images_per_s"], 1e-9)
            out.append({"target": f"tiny CNN, {off['clients']} clients: >= 2x the batching-off images/s",
                        "measured": f"{on['images_per_s']:.0f} vs {off['images_per_s']:.0f} = {ratio:.2f}x",
                        "met": ratio >= 2})
            tail = on["p99_ms"] / on["p50_ms"]
            out.append({"target": f"tiny CNN, {on['clients']} clients: p99 < 2.5x p50",
                        "measured": f"{on['p99_ms']:.1f} / {on['p50_ms']:.1f} = {tail:.2f}", "met": tail < 2.5})
    return out


def markdown(run: dict[str, Any]) -> str:
    m = run["machine"]
    lines = [f"Run {run['started']}: `{run['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; Python {m['python']}, TensorFlow "
             f"{m['tensorflow']}, oneDNN {m['onednn']}, GPUs {m['gpus'] or 'none'}.", ""]
    c = run["ceiling"]
    lines += [f"Hardware ceiling: VGG16 at 224x224 costs {c['vgg16_gflop_per_image']:.1f} GFLOP per image; a "
              f"float32 matrix multiply sustained {c['measured_gflops']:.0f} GFLOP/s on all cores, so "
              f"{c['vgg16_images_per_s_ceiling']:.2f} images/s at most.", ""]
    for kind, e in run["models"].items():
        lim = e["limit"]
        lines += [f"### {kind} ({e['input']}x{e['input']})", "",
                  f"In-process (no HTTP, same decoder; decode {lim['decode_ms_per_image']:.1f} ms/image, not "
                  f"included below):", "",
                  "| batch | callers | latency ms | first call ms | images/s |", "|---|---|---|---|---|"]
        for b in lim["batches"]:
            lines.append(f"| {b['batch_size']} | {b.get('callers', 1)} | {b['latency_ms']:.1f} | "
                         f"{_fmt(b['first_call_ms'])} | {b['images_per_s']:.1f} |")
        lines += ["", f"Service ({', '.join(f'{k}={v}' for k, v in e['settings'].items())}; ready after "
                      f"{e['startup_s']:.1f} s):", "",
                  "| clients | tool | images/s | vs limit | p50 ms | p95 ms | p99 ms | errors | mean batch |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = [*e["service"], *([{**e["baseline"], "label": "batching off"}] if e["baseline"] else [])]
        for r in rows:
            label = f"{r['clients']}" + (" (batching off)" if r.get("label") else "")
            lines.append(f"| {label} | {r['tool']} | {r['images_per_s']:.1f} | "
                         f"{r['images_per_s'] / lim['best_images_per_s']:.2f} | {_fmt(r.get('p50_ms'))} | "
                         f"{_fmt(r.get('p95_ms'))} | {_fmt(r.get('p99_ms'))} | {r['errors']} | "
                         f"{_fmt(r.get('mean_batch_size'), 2)} |")
        lines.append("")
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets(run):
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], path: Path) -> None:
    kinds = list(run["models"])
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 3.8 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        e = run["models"][kind]
        xs = [r["clients"] for r in e["service"]]
        ax = axes[row][0]
        ax.plot(xs, [r["images_per_s"] for r in e["service"]], marker="o", label="service")
        ax.axhline(e["limit"]["best_images_per_s"], color="green", linestyle="--", label="in-process limit")
        if e["baseline"]:
            ax.scatter([e["baseline"]["clients"]], [e["baseline"]["images_per_s"]], color="red",
                       label="batching off", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{kind}: throughput")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        ax.plot(xs, [r.get("p99_ms") for r in e["service"]], marker="o", label="p99")
        ax.plot(xs, [r.get("p50_ms") for r in e["service"]], marker=".", label="p50")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{kind}: latency")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(run: dict[str, Any], out: Path, stamp: str, docs: Path) -> list[Path]:
    run["targets"] = targets(run)
    js, md, png = out / f"{stamp}.json", out / f"{stamp}.md", out / f"{stamp}.png"
    js.write_text(json.dumps(run, indent=2))
    text = markdown(run)
    md.write_text(text)
    plot(run, png)
    docs.parent.mkdir(parents=True, exist_ok=True)
    doc_png = docs.parent / "benchmarks.png"
    doc_png.write_bytes(png.read_bytes())
    docs.write_text("# Benchmarks\n\nThe latest run of `python -m bench` (see the README). Figures are from one "
                    "run on one machine; compare them as ratios within the run. Repeated, paired "
                    "measurements of the targets and the mixed-precision figures are in "
                    "[performance.md](performance.md).\n\n" + text +
                    "\n![throughput and latency](benchmarks.png)\n")
    return [js, md, png, docs]
