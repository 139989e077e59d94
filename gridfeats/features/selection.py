"""Which boxes an image's region features come from: two selection rules.

``detectron2``
    Detectron2's standard inference, exactly as :meth:`gridfeats.api.Detector.detect` returns it
    (score threshold, per-class NMS, top ``TEST.DETECTIONS_PER_IMAGE``, all from the config).

``bottom-up``
    The rule of bottom-up-attention's ``tools/generate_tsv.py`` (the features most VQA and
    captioning code was trained on). For every class (background excluded) NMS runs over all
    proposals with that class's scores (IoU threshold ``nms_thresh``, 0.3 = that repository's
    ``cfg.TEST.NMS``); a proposal's confidence ``max_conf`` is its best score among the classes for
    which it survived. Proposals with ``max_conf >= score_thresh`` are kept; if fewer than
    ``min_boxes`` pass, the ``min_boxes`` most confident are taken, if more than ``max_boxes``
    pass, the ``max_boxes`` most confident (defaults 0.2, 10, 100; ``min = max = 36`` gives the
    fixed-36 features). Kept boxes are listed in proposal order when the threshold decided, in
    decreasing confidence when a bound did (as ``generate_tsv.py`` does; ties by proposal order).

    ``boxes="proposals"`` (default) is ``generate_tsv.py`` itself: NMS and the stored box use the
    proposal (its "keep the original boxes" rule), which is also the box the feature was pooled
    from. ``boxes="regressed"`` is what Detectron2 ports of it do: NMS runs on each class's
    regressed box (clipped to the image), and the stored box is the one of the winning class.
    The feature is the proposal's box-head feature in both; the class is the one that gave
    ``max_conf`` (the lowest class index on a tie, as the reference's strict ``>`` update gives).
    Differences left: torchvision's NMS has no "+1" in box widths (Caffe's had), and boxes are
    scaled back per axis like Detectron2 instead of by one scale factor.

Computing ``max_conf`` for all 1600 classes of 1000 proposals naively means NMS over 1.6M boxes.
Only boxes scoring at least the threshold can matter, and greedy NMS decides a box using higher
scoring boxes only, so NMS runs on the (few) pairs above a floor: the threshold itself, lowered
step by step only when fewer than ``min_boxes`` proposals clear it. The result is exact (up to the
order of exactly equal scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from gridfeats.data.preprocess import PreparedImage
from gridfeats.layers import batched_nms
from gridfeats.modeling.postprocessing import rescale_boxes
from gridfeats.precision import autocast
from gridfeats.structures import Instances
from gridfeats.structures.boxes import clip_boxes_

REGION_RULES = ("detectron2", "bottom-up")
BOX_SOURCES = ("proposals", "regressed")


@dataclass(frozen=True)
class BottomUpSettings:
    """Parameters of the bottom-up-attention selection (see the module docstring)."""

    score_thresh: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    nms_thresh: float = 0.3
    boxes: str = "proposals"

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_thresh <= 1.0:
            raise ValueError(
                f"the bottom-up score threshold must be in [0, 1], got {self.score_thresh}"
            )
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(
                f"need 1 <= min boxes <= max boxes, got {self.min_boxes} and {self.max_boxes}"
            )
        if not 0.0 < self.nms_thresh <= 1.0:
            raise ValueError(
                f"the bottom-up NMS threshold must be in (0, 1], got {self.nms_thresh}"
            )
        if self.boxes not in BOX_SOURCES:
            raise ValueError(f"bottom-up boxes must be one of {BOX_SOURCES}, got {self.boxes!r}")

    def describe(self) -> str:
        return (
            f"bottom-up(score_thresh={self.score_thresh}, min_boxes={self.min_boxes}, "
            f"max_boxes={self.max_boxes}, nms_thresh={self.nms_thresh}, boxes={self.boxes})"
        )


# --- Detectron2's rule ----------------------------------------------------------------------------
def detectron2_regions(detector, prepared: Sequence[PreparedImage]) -> List[Instances]:
    """Detectron2's standard inference: :meth:`Detector.detect_batch` itself."""
    return detector.detect_batch(prepared)


# --- bottom-up-attention's rule -------------------------------------------------------------------
def bottom_up_regions(
    detector, prepared: Sequence[PreparedImage], settings: BottomUpSettings
) -> List[Instances]:
    """bottom-up-attention's selection over :meth:`Detector.region_candidates`, with attributes.

    Results have the fields of :meth:`Detector.detect_batch` (boxes in original pixels).
    """
    heads = detector.model.roi_heads
    out = []
    # generate_tsv.py's own boxes are the proposals: no class-specific box is ever read then.
    class_boxes = settings.boxes == "regressed"
    for candidates, p in zip(detector.region_candidates(prepared, class_boxes), prepared):
        pick = select_bottom_up(candidates, settings)
        features = candidates.box_features[pick.proposal_index].float()
        regions = Instances(
            p.orig_hw,
            pred_boxes=rescale_boxes(pick.pred_boxes.float(), p.input_hw, p.orig_hw),
            pred_boxes_input=pick.pred_boxes.float(),
            scores=pick.scores.float(),
            pred_classes=pick.pred_classes,
            box_features=features,
        )
        if heads.attribute_on:
            with torch.inference_mode(), autocast(detector.precision, detector.device):
                regions.attr_probs = heads.attribute_probs(features, pick.pred_classes).float()
        out.append(regions)
    return out


def select_bottom_up(candidates: Instances, settings: BottomUpSettings) -> Instances:
    """Pick proposals the way ``generate_tsv.py`` does (see the module docstring).

    ``candidates`` is one image's :meth:`ROIHeads.predict` output; the result holds
    ``proposal_index``, ``scores`` (``max_conf``), ``pred_classes`` and ``pred_boxes``
    (network-input pixels) of the kept proposals.
    """
    input_hw = candidates.image_size
    scores = candidates.class_probs[:, :-1].float()  # background is the last column
    num_proposals = scores.shape[0]
    if settings.boxes == "proposals":
        class_boxes = candidates.proposal_boxes.float().reshape(num_proposals, 1, 4)
    else:
        flat = clip_boxes_(candidates.pred_boxes_per_class.float().reshape(-1, 4).clone(), input_hw)
        class_boxes = flat.reshape(num_proposals, -1, 4)
    if num_proposals == 0:
        return _pick(
            input_hw,
            torch.zeros(0, dtype=torch.int64, device=scores.device),
            scores.new_zeros(0),
            torch.zeros(0, dtype=torch.int64, device=scores.device),
            scores.new_zeros(0, 4),
        )

    max_conf, best_class = _confidence_above(
        class_boxes, scores, settings.nms_thresh, settings.score_thresh
    )
    passing = (max_conf >= settings.score_thresh).nonzero().view(-1)
    if len(passing) < settings.min_boxes:
        for floor in _lower_floors(scores, settings.min_boxes, settings.score_thresh):
            max_conf, best_class = _confidence_above(
                class_boxes, scores, settings.nms_thresh, floor
            )
            if int((max_conf >= floor).sum()) >= settings.min_boxes or floor == 0.0:
                break
        index = _most_confident(max_conf, settings.min_boxes)
    elif len(passing) > settings.max_boxes:
        index = _most_confident(max_conf, settings.max_boxes)
    else:
        index = passing

    classes = best_class[index]
    unranked = classes < 0  # survived NMS for no class above the floor: fall back to its best class
    if unranked.any():
        classes = torch.where(unranked, scores[index].argmax(dim=1), classes)
    box_class = classes if class_boxes.shape[1] > 1 else torch.zeros_like(classes)
    return _pick(input_hw, index, max_conf[index], classes, class_boxes[index, box_class])


def _pick(input_hw, index, scores, classes, boxes) -> Instances:
    return Instances(
        input_hw, proposal_index=index, scores=scores, pred_classes=classes, pred_boxes=boxes
    )


def _confidence_above(
    class_boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float, floor: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``max_conf`` and its class per proposal, exact where ``max_conf >= floor`` (else 0, -1)."""
    num_proposals, num_classes = scores.shape
    pairs = (scores >= floor).nonzero()  # proposal-major, class-minor
    max_conf = scores.new_zeros(num_proposals)
    best_class = torch.full((num_proposals,), -1, dtype=torch.int64, device=scores.device)
    if len(pairs) == 0:
        return max_conf, best_class
    proposal, cls = pairs[:, 0], pairs[:, 1]
    pair_scores = scores[proposal, cls]
    pair_boxes = class_boxes[proposal, cls if class_boxes.shape[1] > 1 else torch.zeros_like(cls)]
    keep = batched_nms(pair_boxes, pair_scores, cls, nms_thresh)
    proposal, cls, pair_scores = proposal[keep], cls[keep], pair_scores[keep]
    max_conf.scatter_reduce_(0, proposal, pair_scores, reduce="amax", include_self=True)
    is_best = pair_scores == max_conf[proposal]
    lowest = torch.full((num_proposals,), num_classes, dtype=torch.int64, device=scores.device)
    lowest.scatter_reduce_(0, proposal[is_best], cls[is_best], reduce="amin", include_self=True)
    best_class = torch.where(lowest < num_classes, lowest, best_class)
    return max_conf, best_class


def _lower_floors(scores: torch.Tensor, min_boxes: int, ceiling: float):
    """Score floors below ``ceiling``: the m-th best per-proposal score for m = min_boxes, 2x,
    4x..., ending with 0 (every pair). A proposal's ``max_conf`` never exceeds its best score, so a
    floor is useless until at least ``min_boxes`` proposals have a best score above it."""
    best = scores.max(dim=1).values.sort(descending=True).values
    m = min_boxes
    while m < len(best):
        floor = float(best[m - 1])
        if floor < ceiling:
            yield floor
        m *= 2
    yield 0.0


def _most_confident(max_conf: torch.Tensor, n: int) -> torch.Tensor:
    order = torch.sort(max_conf, descending=True, stable=True).indices
    return order[:n]


# --- attributes -----------------------------------------------------------------------------------
def top_attributes(
    attr_scores: Optional[torch.Tensor], k: int, num_boxes: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable attribute ids per box (int32) and their probabilities (float32)."""
    if attr_scores is None or k == 0:
        return torch.zeros(num_boxes, k, dtype=torch.int32), torch.zeros(
            num_boxes, k, dtype=torch.float32
        )
    if k > attr_scores.shape[1]:
        raise ValueError(f"cannot take the top {k} of {attr_scores.shape[1]} attributes")
    values, ids = torch.topk(attr_scores.float(), k, dim=1)
    return ids.to(torch.int32), values
