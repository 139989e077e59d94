"""NMS with Detectron2@ffff8ac's dispatch, on torchvision's kernels, and an exact vectorised
per-class NMS for the many-class case.

Detectron2 calls torchvision's ``batched_nms`` below 40000 boxes and its own per-class loop above;
torchvision itself uses the coordinate-offset trick up to 1000 boxes on the CPU and a per-class
loop above. The offset trick rounds coordinates, so it can disagree with the per-class result on
borderline IoUs: the reference's dispatch is mirrored to keep the same detections in the same
order.

The per-class loops call the NMS kernel once per class: over Visual Genome's 1600 classes that is
~1600 small calls per image (seconds for bottom-up-attention's selection). :func:`per_class_nms`
computes the same result at once: a padded table of each class's boxes in the kernel's order,
their IoUs with the kernel's float32 formula and operation order, and greedy suppression rank by
rank for all classes together. Its result equals the per-class loop's bit for bit (same kept set,
same final order); it is used when the table fits a memory budget, the per-class loop otherwise.
"""

from __future__ import annotations

import torch
from torchvision.ops import nms

__all__ = ["nms", "batched_nms", "per_class_nms"]

_D2_LOOP_THRESHOLD = 40000
#: torchvision's CPU switch from the offset trick to its per-class loop (``boxes.numel()``).
_TV_VANILLA_NUMEL = {"cpu": 4000}
_TV_VANILLA_NUMEL_OTHER = 100_000
#: The largest ``classes x (largest class)^2`` IoU table :func:`per_class_nms` builds (~64 MB).
MAX_PAIRS = 4_000_000


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Per-group NMS: kept indices sorted by decreasing score (a box is dropped if IoU > thr)."""
    vanilla = _TV_VANILLA_NUMEL.get(boxes.device.type, _TV_VANILLA_NUMEL_OTHER)
    if len(boxes) < _D2_LOOP_THRESHOLD and boxes.numel() <= vanilla:
        return _coordinate_trick_nms(boxes, scores, idxs, iou_threshold)
    return per_class_nms(boxes, scores, idxs, iou_threshold)


def _coordinate_trick_nms(boxes, scores, idxs, iou_threshold) -> torch.Tensor:
    """torchvision's small-input path: one NMS call on boxes shifted apart per class."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def per_class_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each class (no offsets), kept indices sorted by decreasing score: the result of
    torchvision's and Detectron2's per-class loops, computed for all classes at once when
    ``classes x largest class^2`` fits :data:`MAX_PAIRS`."""
    n = len(boxes)
    if n == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # Class-major, then decreasing score, ties by index: each class's order in the NMS kernel
    # (a stable descending sort of that class's boxes, taken in index order).
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(idxs[order], stable=True).indices]
    _, counts = torch.unique_consecutive(idxs[order], return_counts=True)
    largest = int(counts.max())
    if len(counts) == 1 or len(counts) * largest * largest > MAX_PAIRS:
        keep_mask = _per_class_loop(boxes, scores, idxs, iou_threshold)
    else:
        keep_mask = torch.zeros(n, dtype=torch.bool, device=boxes.device)
        keep_mask[order] = _greedy_all_classes(boxes[order], counts, largest, iou_threshold)
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


def _per_class_loop(boxes, scores, idxs, iou_threshold) -> torch.Tensor:
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        members = torch.where(idxs == class_id)[0]
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    return keep_mask


def _greedy_all_classes(
    boxes: torch.Tensor, counts: torch.Tensor, largest: int, iou_threshold: float
) -> torch.Tensor:
    """Greedy NMS of boxes sorted class-major / score-descending (``counts`` per class) for all
    classes at once, on a ``[classes, largest]`` padded table: step ``k`` keeps each class's
    rank-``k`` box if it is still alive and suppresses that class's later boxes overlapping it.
    Returns the alive mask in the sorted order."""
    device = boxes.device
    num_classes = len(counts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(boxes), device=device) - torch.repeat_interleave(starts, counts)
    row = torch.repeat_interleave(torch.arange(num_classes, device=device), counts)
    table = boxes.new_zeros(num_classes, largest, 4)
    table[row, rank] = boxes
    alive = torch.zeros(num_classes, largest, dtype=torch.bool, device=device)
    alive[row, rank] = True
    suppresses = _iou_as_nms_kernel(table) > iou_threshold  # padding: 0/0 = NaN, never True
    for k in range(largest - 1):
        alive[:, k + 1 :] &= ~(suppresses[:, k, k + 1 :] & alive[:, k : k + 1])
    return alive[row, rank]


def _iou_as_nms_kernel(table: torch.Tensor) -> torch.Tensor:
    """``[C, M, M]`` IoUs within each row of a ``[C, M, 4]`` box table, with torchvision's CPU
    kernel's float32 operations in its order, as float64 (the kernel compares the float IoU with
    a double threshold)."""
    x1, y1, x2, y2 = table.unbind(2)
    areas = (x2 - x1) * (y2 - y1)
    zero = torch.zeros((), dtype=table.dtype, device=table.device)
    w = torch.maximum(
        zero,
        torch.minimum(x2[:, :, None], x2[:, None, :])
        - torch.maximum(x1[:, :, None], x1[:, None, :]),
    )
    h = torch.maximum(
        zero,
        torch.minimum(y2[:, :, None], y2[:, None, :])
        - torch.maximum(y1[:, :, None], y1[:, None, :]),
    )
    inter = w * h
    return (inter / (areas[:, :, None] + areas[:, None, :] - inter)).double()
