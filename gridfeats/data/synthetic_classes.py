"""A labelled classification split of synthetic images: one shape of one colour per image.

``make_classification(out, per_class)`` writes
``out/classify/{train,val}/<shape>_<colour>/NNNNN.png``
(class = sub-folder, the layout the kNN monitor of ``gridfeats pretrain --knn-train/--knn-val``
reads, and ``--data`` accepts as a folder). Each image has a random background tint and noise, the
shape at a random position, size and rotation, so classes differ in shape and colour only.
Deterministic per seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Union

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210)}


def _draw(rng: np.random.Generator, shape: str, colour, size: int) -> Image.Image:
    bg = rng.integers(150, 256, size=3)
    pixels = np.clip(bg + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    jitter = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    else:
        n = 4 if shape == "square" else 3
        a0 = rng.uniform(0, 2 * math.pi)
        pts = [
            (
                cx + r * math.cos(a0 + 2 * math.pi * k / n),
                cy + r * math.sin(a0 + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]
        d.polygon(pts, fill=jitter)
    return img


def make_classification(
    out_dir: Union[str, Path],
    per_class: int,
    seed: int = 0,
    size: int = 64,
    val_fraction: float = 0.25,
) -> Dict[str, Path]:
    """Write ``per_class`` images per class (9 classes), ``val_fraction`` of them under ``val``."""
    if per_class < 2:
        raise ValueError("per_class must be >= 2 (one train and one val image at least)")
    root = Path(out_dir) / "classify"
    n_val = max(1, int(round(per_class * val_fraction)))
    for ci, (shape, (cname, colour)) in enumerate((s, c) for s in SHAPES for c in COLOURS.items()):
        rng = np.random.default_rng([seed, 7, ci])
        for i in range(per_class):
            split = "val" if i < n_val else "train"
            folder = root / split / f"{shape}_{cname}"
            folder.mkdir(parents=True, exist_ok=True)
            _draw(rng, shape, colour, size).save(folder / f"{i:05d}.png")
    return {"train": root / "train", "val": root / "val"}
