"""A loss-curve PNG from a run's ``metrics.jsonl``, drawn with PIL (matplotlib is not a dependency).

One line per loss term (``loss_*`` and ``total_loss``) of the ``train`` records against the step,
on linear axes from 0 to the largest value of the 99th percentile of each term (so that the first
steps' spike does not flatten the rest), with tick labels and a legend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)
SIZE = (960, 540)
MARGIN = (70, 30, 30, 50)  # left, top, right, bottom


def loss_series(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[Tuple[int, float]]]:
    """``{term: [(step, value), ...]}`` for the loss terms of the ``train`` records."""
    series: Dict[str, List[Tuple[int, float]]] = {}
    for record in records:
        if record.get("kind") != "train":
            continue
        for key, value in record.items():
            if (key.startswith("loss") or key == "total_loss") and isinstance(value, (int, float)):
                if math.isfinite(value):
                    series.setdefault(key, []).append((int(record["step"]), float(value)))
    return series


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def plot_loss_curve(
    records: Sequence[Mapping[str, Any]],
    path: Union[str, Path],
    title: str = "training losses",
) -> Path:
    """Draw the loss terms of ``records`` into ``path`` (PNG); returns the path."""
    series = loss_series(records)
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top, SIZE[0] - right, SIZE[1] - bottom
    draw.text((x0, 8), title, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    if not series:
        draw.text((x0 + 10, y0 + 10), "no training records yet", fill="black", font=font)
    else:
        steps = [s for points in series.values() for s, _ in points]
        s_min, s_max = min(steps), max(steps)
        if s_max == s_min:
            s_max = s_min + 1
        caps = []
        for points in series.values():
            values = sorted(v for _, v in points)
            caps.append(values[min(len(values) - 1, int(0.99 * len(values)))])
        v_max = max(max(caps), 1e-12)
        v_step = _nice_step(v_max)
        v_max = math.ceil(v_max / v_step) * v_step

        def to_xy(step: float, value: float) -> Tuple[float, float]:
            x = x0 + (step - s_min) / (s_max - s_min) * (x1 - x0)
            y = y1 - min(max(value, 0.0), v_max) / v_max * (y1 - y0)
            return x, y

        tick = 0.0
        while tick <= v_max + 1e-12:
            _, y = to_xy(s_min, tick)
            draw.line((x0, y, x1, y), fill=(225, 225, 225))
            draw.text((8, y - 6), f"{tick:.3g}", fill="black", font=font)
            tick += v_step
        s_step = max(1, int(_nice_step(s_max - s_min)))
        tick_s = math.ceil(s_min / s_step) * s_step
        while tick_s <= s_max:
            x, _ = to_xy(tick_s, 0.0)
            draw.line((x, y1, x, y1 + 4), fill="black")
            draw.text((x - 10, y1 + 8), str(tick_s), fill="black", font=font)
            tick_s += s_step
        draw.text(((x0 + x1) // 2 - 15, y1 + 28), "step", fill="black", font=font)
        for index, (name, points) in enumerate(sorted(series.items())):
            colour = PALETTE[index % len(PALETTE)]
            xy = [to_xy(s, v) for s, v in points]
            if len(xy) == 1:
                x, y = xy[0]
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            else:
                draw.line(xy, fill=colour, width=2)
            ly = y0 + 8 + 14 * index
            draw.line((x1 - 150, ly + 6, x1 - 130, ly + 6), fill=colour, width=3)
            draw.text((x1 - 125, ly), f"{name} {points[-1][1]:.4f}", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
