"""Image -> network input, exactly as Detectron2's test mapper does it.

Runs on the CPU and touches no model, so the batch job can call it in DataLoader workers and the
service in its decode threads: the same function everywhere means the same numbers everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from gridfeats.data.image_io import DEFAULT_MAX_PIXELS, ImageSource, read_image
from gridfeats.data.transforms import resize_shortest_edge_size, resize_uint8


@dataclass
class PreparedImage:
    """A decoded, resized image ready for the model.

    ``image`` is the ``[3, h, w]`` uint8 tensor in the channel order the model expects (BGR for the
    Detectron2 configs), ``orig_hw`` the decoded size after EXIF orientation (boxes are reported in
    it) and ``input_hw`` the resized size ``(h, w)``.
    """

    image: torch.Tensor
    orig_hw: Tuple[int, int]
    input_hw: Tuple[int, int]


def prepare_image(
    source: ImageSource,
    min_size: int = 600,
    max_size: int = 1000,
    input_format: str = "BGR",
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Read ``source``; resize its short edge to ``min_size`` (long edge at most ``max_size``)."""
    rgb = read_image(source, max_pixels=max_pixels)
    return prepare_rgb(rgb, min_size, max_size, input_format)


def prepare_rgb(
    rgb: np.ndarray, min_size: int, max_size: int, input_format: str = "BGR"
) -> PreparedImage:
    """Resize an already decoded ``HxWx3`` RGB uint8 array (see :func:`prepare_image`)."""
    h, w = rgb.shape[:2]
    if input_format == "BGR":
        img = rgb[:, :, ::-1]
    elif input_format == "RGB":
        img = rgb
    else:
        raise ValueError(f"unsupported INPUT.FORMAT {input_format!r} (expected BGR or RGB)")
    newh, neww = resize_shortest_edge_size(h, w, min_size, max_size)
    img = resize_uint8(np.ascontiguousarray(img), newh, neww)
    tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return PreparedImage(image=tensor, orig_hw=(int(h), int(w)), input_hw=(int(newh), int(neww)))
