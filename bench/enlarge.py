"""A larger copy of a folder-per-class dataset: each image plus `factor - 1` augmented duplicates (mirror,
crop, rotation, colour), written as JPEG with the same layout (train/, validation/, ... kept).

For memory tests of training at a scale the shared data does not have: its duplicates are not new
photos, so accuracy measured on such a copy means little (a test split carved from it holds
duplicates of training images).

    python -m bench.enlarge --src ../shared/datasets/clothing-small --out /tmp/clothing-x10 --factor 10
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def variant(img: Image.Image, rng: random.Random) -> Image.Image:
    """One random duplicate: maybe mirrored, cropped to 80-100%, rotated up to 10 degrees, recoloured."""
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    w, h = img.size
    s = rng.uniform(0.8, 1.0)
    cw, ch = max(1, int(w * s)), max(1, int(h * s))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, expand=False)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))


def enlarge(src: Path, out: Path, factor: int, seed: int = 0, workers: int = 2) -> int:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"no images under {src}")

    def one(i_path: tuple[int, Path]) -> int:
        i, path = i_path
        rng = random.Random(seed * 1_000_003 + i)
        rel = path.relative_to(src)
        target = out / rel.parent
        target.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            img = im.convert("RGB")
        img.save(target / f"{rel.stem}.jpg", quality=90)
        for k in range(1, factor):
            variant(img, rng).save(target / f"{rel.stem}-x{k}.jpg", quality=90)
        return factor

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, enumerate(files)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    n = enlarge(args.src, args.out, args.factor, args.seed, args.workers)
    print(f"wrote {n} images under {args.out}")


if __name__ == "__main__":
    main()
