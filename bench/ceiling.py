"""The hardware ceiling: VGG16's FLOPs per image, and this machine's arithmetic peak per precision.

The peak comes from bench/peak.c, compiled here with gcc and run on every core: independent chains of
one AVX-512 instruction (FMA for fp32, vdpbf16ps for bf16, vpdpbusd for int8). A numpy matmul is also
reported, but on these machines OPENBLAS_CORETYPE=Haswell holds OpenBLAS to AVX2, so it is no peak."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

VGG16_CONVS = [  # (input size, c_in, c_out) of the 13 3x3 convolutions at 224x224
    (224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128), (56, 128, 256), (56, 256, 256), (56, 256, 256),
    (28, 256, 512), (28, 512, 512), (28, 512, 512), (14, 512, 512), (14, 512, 512), (14, 512, 512),
]


def vgg16_gflop_per_image() -> float:
    """2 FLOPs per multiply-add of the convolutions (the classifier head is negligible)."""
    return sum(2 * s * s * ci * co * 9 for s, ci, co in VGG16_CONVS) / 1e9


def fma_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained float32 matrix-multiply throughput on all cores (BLAS FMA kernels)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def peak_gops(runs: int = 3) -> dict[str, float]:
    """GFLOP/s (fp32, bf16) and GOP/s (int8) of this CPU on all cores, best of `runs`; {} without gcc
    (each precision appears only when the CPU has its instruction; fp32 falls back to AVX2 FMA)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "peak"
        subprocess.run([gcc, "-O2", "-pthread", "-o", str(exe), str(Path(__file__).with_name("peak.c"))],
                       check=True, capture_output=True)
        best: dict[str, float] = {}
        for _ in range(runs):
            out = subprocess.run([str(exe), str(os.cpu_count() or 1)], check=True, capture_output=True, text=True)
            for line in out.stdout.split("\n"):
                if line.strip():
                    name, value = line.split()
                    best[name] = max(best.get(name, 0.0), float(value))
    return best


def flop_ceiling() -> dict[str, object]:
    """VGG16 images/s this CPU could reach at its peak, per precision (and the old matmul figure)."""
    gflop = vgg16_gflop_per_image()
    matmul = fma_gflops()
    peaks = peak_gops()
    return {"vgg16_gflop_per_image": gflop, "measured_gflops": matmul, "vgg16_images_per_s_ceiling": matmul / gflop,
            "peak_gops": peaks, "vgg16_images_per_s_at_peak": {k: v / gflop for k, v in peaks.items()},
            "peak_method": "bench/peak.c: AVX-512 vfmadd231ps / vdpbf16ps / vpdpbusd chains on every core "
            "(AVX2 vfmadd231ps for fp32 on CPUs without AVX-512)"}
