"""The hardware ceiling: VGG16's FLOPs per image, and this machine's measured FMA throughput."""

from __future__ import annotations

import time

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


def flop_ceiling() -> dict[str, float]:
    gflop = vgg16_gflop_per_image()
    peak = fma_gflops()
    return {"vgg16_gflop_per_image": gflop, "measured_gflops": peak, "vgg16_images_per_s_ceiling": peak / gflop}
