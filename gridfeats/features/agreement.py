"""How close a fast mode's region features are to the exact mode's: the quality side of speed.

A fast mode (folded norms, bf16) changes float rounding, so near-tied scores can swap and a
detection can move slightly or change class. :func:`region_agreement` pairs each reference
(exact-mode) region with at most one region of the other run of the same class at IoU >= 0.9
(greedy, in the reference's order), and reports the share of reference regions matched, the cosine
similarity of the matched features and how often their top-1 attribute agrees. The benchmark and
the tests use it on the Detectron2 parity photos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from gridfeats.structures import Instances
from gridfeats.structures.boxes import pairwise_iou


@dataclass
class Agreement:
    """Totals over images: ``matched / reference`` regions, the matched features' cosines."""

    reference: int = 0
    matched: int = 0
    cosine_min: float = 1.0
    cosine_sum: float = 0.0
    attr_agree: int = 0
    attr_pairs: int = 0

    @property
    def matched_share(self) -> float:
        return self.matched / self.reference if self.reference else 1.0

    @property
    def cosine_mean(self) -> float:
        return self.cosine_sum / self.matched if self.matched else 1.0

    @property
    def attr_top1(self) -> float:
        return self.attr_agree / self.attr_pairs if self.attr_pairs else 1.0

    def describe(self) -> str:
        text = (
            f"{self.matched_share:.1%} of {self.reference} matched, feature cosine min "
            f"{self.cosine_min:.6f} mean {self.cosine_mean:.6f}"
        )
        if self.attr_pairs:
            text += f", attribute top-1 agreement {self.attr_top1:.1%}"
        return text


def match_regions(reference: Instances, other: Instances, iou_thresh: float = 0.9) -> List[tuple]:
    """``(i, j)`` pairs: reference region ``i`` matched to ``other`` region ``j`` (same class,
    IoU >= ``iou_thresh``, the best unmatched one), in the reference's order."""
    if len(reference) == 0 or len(other) == 0:
        return []
    iou = pairwise_iou(reference.pred_boxes.double(), other.pred_boxes.double())
    same = reference.pred_classes[:, None] == other.pred_classes[None, :]
    iou = torch.where(same, iou, torch.zeros_like(iou))
    taken = torch.zeros(len(other), dtype=torch.bool)
    pairs = []
    for i in range(len(reference)):
        row = iou[i].masked_fill(taken, 0.0)
        j = int(row.argmax())
        if row[j] >= iou_thresh:
            taken[j] = True
            pairs.append((i, j))
    return pairs


def region_agreement(
    references: Sequence[Instances], others: Sequence[Instances], iou_thresh: float = 0.9
) -> Agreement:
    """:class:`Agreement` of ``others`` with ``references`` (lists of per-image regions with
    ``pred_boxes``, ``pred_classes``, ``box_features`` and optionally ``attr_probs`` or
    ``attr_top1``)."""
    total = Agreement()
    for ref, oth in zip(references, others):
        pairs = match_regions(ref, oth, iou_thresh)
        total.reference += len(ref)
        total.matched += len(pairs)
        if not pairs:
            continue
        i = torch.tensor([p[0] for p in pairs])
        j = torch.tensor([p[1] for p in pairs])
        cos = torch.nn.functional.cosine_similarity(
            ref.box_features[i].double(), oth.box_features[j].double(), dim=1
        )
        total.cosine_min = min(total.cosine_min, float(cos.min()))
        total.cosine_sum += float(cos.sum())
        top_ref, top_oth = _attr_top1(ref), _attr_top1(oth)
        if top_ref is not None and top_oth is not None:
            total.attr_agree += int((top_ref[i] == top_oth[j]).sum())
            total.attr_pairs += len(pairs)
    return total


def _attr_top1(regions: Instances):
    """Each region's most probable attribute: from ``attr_probs``, or ``attr_top1`` (a store
    record's first ``attr_ids`` column); None without attributes."""
    if regions.has("attr_probs"):
        return regions.attr_probs.argmax(dim=1)
    return regions.attr_top1 if regions.has("attr_top1") else None
