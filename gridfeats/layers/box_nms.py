"""NMS with Detectron2@ffff8ac's dispatch, on torchvision's kernels.

Detectron2 calls torchvision's ``batched_nms`` below 40000 boxes and its own per-class loop above;
the two can disagree on borderline IoUs (the coordinate-offset trick rounds coordinates), so the
reference's dispatch is mirrored to keep the same detections in the same order.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms as _tv_batched_nms
from torchvision.ops import nms

__all__ = ["nms", "batched_nms"]

_D2_LOOP_THRESHOLD = 40000


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Per-group NMS; returns kept indices sorted by decreasing score. A box is dropped if IoU > thr."""
    if len(boxes) < _D2_LOOP_THRESHOLD:
        return _tv_batched_nms(boxes, scores, idxs, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs).cpu().tolist():
        members = (idxs == group).nonzero().view(-1)
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = keep_mask.nonzero().view(-1)
    return keep[scores[keep].argsort(descending=True)]
