"""float32 against mixed precision (IMGSERVE_MIXED_PRECISION: bfloat16 on a CPU with AVX512_BF16/AMX,
float16 on a GPU) for one published version: in-process images/s at one batch size, and how far the
16-bit answers are from the float32 ones on real images (top-1 agreement, largest probability change).

    python -m bench.precision                                   # the VGG16 benchmark model
    python -m bench.precision --version-dir model_store/clothing/1 --images DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.harness import DEFAULT_IMAGES, REPO, service_env
from bench.runs import ensure_model


def _child(version_dir: Path, images: Path, batch: int, seconds: float, mixed: bool, out: Path) -> None:
    """Runs in a fresh process (precision is fixed when TensorFlow first builds the graph)."""
    from service.imaging import load_image
    from service.runtimes.tensorflow import SavedModelRuntime as SavedModelClassifier
    from service.runtimes.tensorflow import configure as configure_tensorflow

    device = configure_tensorflow(mixed_precision=mixed)
    clf = SavedModelClassifier(version_dir)
    h, w = clf.input_shape
    x = np.stack([load_image(f, h, w) for f in sorted(images.rglob("*.jpg"))[:64]])
    np.save(out, np.concatenate([clf.predict(x[i:i + batch]) for i in range(0, len(x), batch)]))
    b = x[:batch]
    clf.predict(b)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        clf.predict(b)
        n += batch
    print(json.dumps({"device": device, "images_per_s": n / (time.perf_counter() - t)}))


def _measure(version_dir: Path, images: Path, batch: int, seconds: float, mixed: bool, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "bench.precision", "--child", json.dumps(
        [str(version_dir), str(images), batch, seconds, mixed, str(out)])], cwd=REPO, env=service_env(),
        capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        vdir, images, batch, seconds, mixed, out = json.loads(sys.argv[2])
        _child(Path(vdir), Path(images), batch, seconds, mixed, Path(out))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--version-dir", type=Path)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=2, help="alternate float32 and mixed this many times")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    vdir = args.version_dir or ensure_model(REPO / "bench" / ".store", "vgg16")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    runs: dict[str, list[float]] = {"float32": [], "mixed": []}
    device = ""
    for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
        for name, mixed in (("float32", False), ("mixed", True)):
            r = _measure(vdir, args.images, args.batch, args.seconds, mixed, args.out / f".{stamp}-{name}.npy")
            runs[name].append(r["images_per_s"])
            device = r["device"] if mixed else device
    p32, p16 = (np.load(args.out / f".{stamp}-{n}.npy") for n in ("float32", "mixed"))
    for n in ("float32", "mixed"):
        (args.out / f".{stamp}-{n}.npy").unlink()
    f32, f16 = float(np.mean(runs["float32"])), float(np.mean(runs["mixed"]))
    result = {"started": stamp, "command": " ".join(["python -m bench.precision", *sys.argv[1:]]),
              "version_dir": str(vdir), "device_mixed": device, "batch": args.batch, "images": len(p32),
              "float32_images_per_s": runs["float32"], "mixed_images_per_s": runs["mixed"],
              "speedup": f16 / f32, "top1_agreement": float(np.mean(p32.argmax(1) == p16.argmax(1))),
              "max_abs_probability_change": float(np.abs(p32 - p16).max())}
    (args.out / f"{stamp}-precision.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
