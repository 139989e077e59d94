"""Box helpers on plain ``[N, 4]`` float tensors in ``(x0, y0, x1, y1)`` absolute pixels.

Detectron2 wraps boxes in a ``Boxes`` class; here the few operations inference needs are functions
on tensors, with Detectron2's conventions: no "+1" in widths, clipping to ``[0, w] x [0, h]``.
"""

from __future__ import annotations

from typing import Tuple

import torch


def clip_boxes_(boxes: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
    """Clamp x to ``[0, w]`` and y to ``[0, h]`` in place; returns ``boxes``."""
    h, w = image_hw
    boxes[:, 0].clamp_(min=0, max=w)
    boxes[:, 1].clamp_(min=0, max=h)
    boxes[:, 2].clamp_(min=0, max=w)
    boxes[:, 3].clamp_(min=0, max=h)
    return boxes


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Mask of boxes whose width and height are both strictly greater than ``threshold``."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths > threshold) & (heights > threshold)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` IoU matrix; 0 where boxes do not intersect (so empty boxes never match)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return torch.where(
        inter > 0, inter / (area1[:, None] + area2[None, :] - inter), torch.zeros_like(inter)
    )


def scale_boxes_(boxes: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    """Multiply x coordinates by ``scale_x`` and y by ``scale_y`` in place."""
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    return boxes
