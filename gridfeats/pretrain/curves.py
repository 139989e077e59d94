"""``RUN_DIR/curves.png``: loss per step, and kNN top-1 and output_std*sqrt(d) per epoch.

Drawn with PIL (already a dependency) rather than adding matplotlib for three line plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw

W, H, PAD = 360, 240, 34


def _panel(title: str, xs: Sequence[float], ys: Sequence[float], colour: str) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, 6), title, fill="black")
    d.rectangle([PAD, PAD, W - 10, H - PAD], outline="grey")
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        d.text((PAD + 10, H // 2), "no data", fill="grey")
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x1 = x1 if x1 > x0 else x0 + 1

    def at(x: float, y: float) -> Tuple[float, float]:
        return (
            PAD + (x - x0) / (x1 - x0) * (W - 10 - PAD),
            H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD),
        )

    d.line([at(x, y) for x, y in pts], fill=colour, width=2) if len(pts) > 1 else None
    for x, y in pts[-1:] + pts[:1]:
        d.ellipse([at(x, y)[0] - 2, at(x, y)[1] - 2, at(x, y)[0] + 2, at(x, y)[1] + 2], fill=colour)
    d.text((2, PAD), f"{y1:.3g}", fill="black")
    d.text((2, H - PAD - 10), f"{y0:.3g}", fill="black")
    d.text((PAD, H - PAD + 4), f"{x0:.3g}", fill="black")
    d.text((W - 50, H - PAD + 4), f"{x1:.3g}", fill="black")
    return img


def plot_curves(metrics: Path, out: Path) -> None:
    rows: List[dict] = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
    steps = [r for r in rows if "loss" in r]
    epochs = [r for r in rows if "output_std" in r]
    panels = [
        _panel("loss / step", [r["step"] for r in steps], [r["loss"] for r in steps], "navy"),
        _panel(
            "kNN top-1 / epoch",
            [r["epoch"] for r in epochs],
            [r.get("knn_top1") for r in epochs],
            "darkgreen",
        ),
        _panel(
            "output_std*sqrt(d) / epoch",
            [r["epoch"] for r in epochs],
            [r["output_std"] * math.sqrt(r["output_dim"]) for r in epochs],
            "darkred",
        ),
    ]
    canvas = Image.new("RGB", (W * len(panels), H), "white")
    for i, p in enumerate(panels):
        canvas.paste(p, (i * W, 0))
    canvas.save(out)
