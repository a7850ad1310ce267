"""A small synthetic dataset of drawn shapes, so the quick start works offline with no download."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")


def draw(shape: str, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One RGB image of `shape` with a random colour, position, scale, background and noise."""
    bg = rng.integers(0, 90, 3)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    # a gradient background and a few distracting lines
    ramp = np.linspace(-30, 30, size)[None, :, None]
    img = np.clip(img.astype(np.int16) + ramp.astype(np.int16), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 3))):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2),
                 tuple(int(v) for v in rng.integers(0, 256, 3)), 1)
    colour = tuple(int(v) for v in rng.integers(150, 256, 3))
    cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
    r = int(rng.integers(size // 5, size // 3))
    if shape == "circle":
        cv2.circle(img, (cx, cy), r, colour, -1)
    elif shape == "square":
        angle = float(rng.uniform(0, 90))
        box = cv2.boxPoints(((cx, cy), (1.6 * r, 1.6 * r), angle)).astype(np.int32)
        cv2.fillPoly(img, [box], colour)
    elif shape == "triangle":
        a0 = rng.uniform(0, 2 * np.pi)
        pts = [(cx + r * np.cos(a0 + k * 2 * np.pi / 3), cy + r * np.sin(a0 + k * 2 * np.pi / 3)) for k in range(3)]
        cv2.fillPoly(img, [np.asarray(pts, np.int32)], colour)
    elif shape == "cross":
        t = max(2, r // 3)
        cv2.rectangle(img, (cx - r, cy - t), (cx + r, cy + t), colour, -1)
        cv2.rectangle(img, (cx - t, cy - r), (cx + t, cy + r), colour, -1)
    else:
        raise ValueError(shape)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_class: int = 120, seed: int = 7, size: int = 96) -> Path:
    """Write `per_class` JPEGs of each shape under `root/<shape>/` and return `root`."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rgb = draw(shape, rng, size)
            cv2.imwrite(str(folder / f"{shape}-{i:04d}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root
