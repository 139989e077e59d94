"""The one resize of the project: Detectron2's ``ResizeShortestEdge`` at test time.

Parity with Detectron2 needs both its size rule (Python-double arithmetic, ``int(x + 0.5)``) and its
resampler: PIL's bilinear filter on the uint8 image (anti-aliased when shrinking, rounded per pass).
``torch.nn.functional.interpolate`` gives different pixels, so it is deliberately not used.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image


def resize_shortest_edge_size(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """Output ``(newh, neww)`` of ResizeShortestEdge(short, max_size) for an ``h x w`` image."""
    if short <= 0:
        return h, w
    scale = short * 1.0 / min(h, w)
    if h < w:
        newh, neww = float(short), scale * w
    else:
        newh, neww = scale * h, float(short)
    if max(newh, neww) > max_size:
        k = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * k, neww * k
    return int(newh + 0.5), int(neww + 0.5)


def resize_uint8(img: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """Resize an ``HxWxC`` uint8 array with PIL bilinear (Detectron2's ``ResizeTransform``)."""
    if img.dtype != np.uint8:
        raise TypeError(f"resize_uint8 expects uint8, got {img.dtype}")
    if img.shape[:2] == (newh, neww):
        return img
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((neww, newh), Image.BILINEAR))
