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

The RPN keeps only the first ``POST_NMS_TOPK`` of an NMS over ``PRE_NMS_TOPK`` boxes (1000 of
6000 at test time), yet the kernel suppresses through all of them. :func:`nms_top_k` stops once
it has kept enough: the same indices as ``nms(...)[:k]``, from chunks of the score order.
"""

from __future__ import annotations

import torch
from torchvision.ops import nms

__all__ = ["nms", "nms_top_k", "batched_nms", "per_class_nms"]

_D2_LOOP_THRESHOLD = 40000
#: torchvision's CPU switch from the offset trick to its per-class loop (``boxes.numel()``).
_TV_VANILLA_NUMEL = {"cpu": 4000}
_TV_VANILLA_NUMEL_OTHER = 100_000
#: The largest ``classes x (largest class)^2`` IoU table :func:`per_class_nms` builds (~64 MB).
MAX_PAIRS = 4_000_000
#: The smallest score-order chunk :func:`nms_top_k` runs the kernel on.
MIN_TOP_K_CHUNK = 512


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


def nms_top_k(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    k: int,
    exact_tie_order: bool = True,
) -> torch.Tensor:
    """``batched_nms(boxes, scores, <one group>, iou_threshold)[:k]`` (an RPN's single-level call
    in Detectron2), without suppressing past the ``k``-th kept box where that gives the same result.

    Greedy NMS keeps a box iff no kept box of higher rank overlaps it, so the score order can be
    cut into chunks: a chunk's boxes are first checked against the boxes kept so far (the
    kernel's float32 IoU, :func:`_iou_as_nms_kernel`), then the survivors go through the kernel,
    which keeps the chunk's order (its stable descending sort of already sorted scores). The
    loop ends at ``k`` kept boxes; on an RPN's 6000 proposals that is well before the end.

    That is the kernel's order, which ``batched_nms`` returns up to 1000 boxes. Above, it re-sorts
    the kept set by score with a sort that is not stable, so kept boxes of tied scores can come out
    in another order, decided by the whole kept set. The early result is that order when the first
    ``k`` kept scores are distinct and no later box ties the ``k``-th; otherwise the full NMS runs
    (about 80 ms over an RPN's 6000 boxes on 2 AVX2 cores, where the early result took 8).
    ``exact_tie_order=False`` (the fast modes) always returns the early result: the kernel's
    order, so the boxes differ only in the order of exactly equal scores (and, where the ``k``-th
    kept score ties a later kept one, in which of them is taken).
    """
    if len(boxes) == 0 or k <= 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    positions = _first_k_kept(boxes[order], scores[order], iou_threshold, k)
    vanilla = _TV_VANILLA_NUMEL.get(boxes.device.type, _TV_VANILLA_NUMEL_OTHER)
    if boxes.numel() <= vanilla or not exact_tie_order:
        return order[positions]
    kept_scores = scores[order[positions]]
    distinct = bool((kept_scores[1:] < kept_scores[:-1]).all())
    last = int(positions[-1]) if len(positions) else -1
    if distinct and len(positions) == k and last + 1 < len(order):
        distinct = bool(scores[order[last + 1]] < scores[order[last]])
    if distinct:
        return order[positions]
    group = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    return batched_nms(boxes, scores, group, iou_threshold)[:k]


def _first_k_kept(
    sorted_boxes: torch.Tensor, sorted_scores: torch.Tensor, iou_threshold: float, k: int
) -> torch.Tensor:
    """Positions of the kernel's first ``k`` kept boxes among boxes sorted by decreasing score."""
    n = len(sorted_boxes)
    kept = []
    kept_boxes = sorted_boxes[:0]
    count = start = 0
    while start < n and count < k:
        # Twice the boxes still wanted: the kernel suppresses through a whole chunk, and where
        # few boxes are suppressed (low scores, spread out) a larger one would be wasted work.
        stop = min(n, start + max(MIN_TOP_K_CHUNK, 2 * (k - count)))
        positions = torch.arange(start, stop, device=sorted_boxes.device)
        chunk_boxes = sorted_boxes[start:stop]
        start = stop
        if count:
            overlaps = _iou_as_nms_kernel(kept_boxes[None], chunk_boxes[None])[0]
            alive = ~(overlaps > iou_threshold).any(dim=0)
            positions, chunk_boxes = positions[alive], chunk_boxes[alive]
        if len(positions) == 0:
            continue
        keep = nms(chunk_boxes, sorted_scores[positions], iou_threshold)[: k - count]
        kept.append(positions[keep])
        kept_boxes = torch.cat([kept_boxes, chunk_boxes[keep]])
        count += len(keep)
    if not kept:
        return torch.empty((0,), dtype=torch.int64, device=sorted_boxes.device)
    return torch.cat(kept)


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
    suppresses = _iou_as_nms_kernel(table, table) > iou_threshold  # padding: 0/0 = NaN, never
    for k in range(largest - 1):
        alive[:, k + 1 :] &= ~(suppresses[:, k, k + 1 :] & alive[:, k : k + 1])
    return alive[row, rank]


def _iou_as_nms_kernel(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[C, M, N]`` IoUs between the rows of ``[C, M, 4]`` and ``[C, N, 4]`` box tables, with
    torchvision's CPU kernel's float32 operations in its order, as float64 (the kernel compares
    the float IoU with a double threshold)."""
    ax1, ay1, ax2, ay2 = (t[:, :, None] for t in first.unbind(2))
    bx1, by1, bx2, by2 = (t[:, None, :] for t in second.unbind(2))
    zero = torch.zeros((), dtype=first.dtype, device=first.device)
    w = torch.maximum(zero, torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1))
    h = torch.maximum(zero, torch.minimum(ay2, by2) - torch.maximum(ay1, by1))
    inter = w * h
    return (inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)).double()
