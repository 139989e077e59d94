"""Box classification/regression layers, their training losses and Detectron2's test-time
detection selection."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fvcore.nn import smooth_l1_loss
from torch import nn

from gridfeats.layers import batched_nms
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.structures import clip_boxes_


class FastRCNNOutputLayers(nn.Module):
    """``cls_score``: K+1 logits, **background last**; ``bbox_pred``: 4 deltas per foreground
    class."""

    def __init__(self, input_size: int, num_classes: int, cls_agnostic_bbox_reg: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(input_size, num_classes + 1)
        self.bbox_pred = nn.Linear(input_size, 4 * (1 if cls_agnostic_bbox_reg else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0)
        nn.init.constant_(self.bbox_pred.bias, 0)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # Always float32, also under a bf16/fp16 autocast: these logits decide thresholds, NMS
        # order and classes, and bf16's 8-bit mantissa would tie or reorder them (a no-op in fp32).
        with torch.autocast(x.device.type, enabled=False):
            x = _flat_float(x)
            return self.cls_score(x), self.bbox_pred(x)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)[0]`` alone, for selection rules that never read class-specific boxes
        (bottom-up-attention's, which keeps the proposals): the box deltas are 4x the classifier's
        arithmetic (6400 against 1601 outputs for Visual Genome)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.cls_score(_flat_float(x))


def _flat_float(x: torch.Tensor) -> torch.Tensor:
    return (torch.flatten(x, start_dim=1) if x.dim() > 2 else x).float()


def fast_rcnn_losses(
    pred_class_logits: torch.Tensor,
    pred_proposal_deltas: torch.Tensor,
    proposal_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    box2box: Box2BoxTransform,
    smooth_l1_beta: float,
    normalizer: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """Detectron2@ffff8ac's ``FastRCNNOutputs.losses`` over the sampled proposals of the batch.

    ``loss_cls``: mean softmax cross-entropy over all R proposals (``K + 1`` classes, background
    ``K``). ``loss_box_reg``: smooth-L1 over the 4 delta columns of each foreground proposal's gt
    class (class-specific) or the only 4 (class-agnostic), summed and divided by R, the number of
    *sampled* proposals, not the foreground count.

    ``normalizer``: divide both sums by it instead of R (``SOLVER.RANK_INVARIANT`` passes all
    ranks' R over the world size); ``None`` is the reference computation above.
    """
    if gt_classes.numel() == 0:  # no proposal at all: zero losses that still reach every weight
        zero = pred_class_logits.sum() * 0.0 + pred_proposal_deltas.sum() * 0.0
        return {"loss_cls": zero, "loss_box_reg": zero.clone()}
    if normalizer is None:
        loss_cls = F.cross_entropy(pred_class_logits, gt_classes, reduction="mean")
    else:
        loss_cls = F.cross_entropy(pred_class_logits, gt_classes, reduction="sum") / normalizer
    gt_deltas = box2box.get_deltas(proposal_boxes, gt_boxes)
    box_dim = gt_deltas.size(1)
    bg_class = pred_class_logits.shape[1] - 1
    fg_inds = torch.nonzero((gt_classes >= 0) & (gt_classes < bg_class)).squeeze(1)
    arange = torch.arange(box_dim, device=pred_proposal_deltas.device)
    if pred_proposal_deltas.size(1) == box_dim:  # class-agnostic
        cols = arange
    else:
        cols = box_dim * gt_classes[fg_inds][:, None] + arange
    loss_box_reg = smooth_l1_loss(
        pred_proposal_deltas[fg_inds[:, None], cols],
        gt_deltas[fg_inds],
        smooth_l1_beta,
        reduction="sum",
    )
    divisor = gt_classes.numel() if normalizer is None else normalizer
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg / divisor}


def predict_boxes_and_probs(
    logits: torch.Tensor,
    deltas: Optional[torch.Tensor],
    proposals: torch.Tensor,
    box2box: Box2BoxTransform,
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Class probabilities ``[R, K+1]`` and decoded class-specific boxes ``[R, 4K]`` of one
    image (``None`` without ``deltas``: a rule that reads no class-specific box)."""
    probs = torch.softmax(logits, dim=-1)
    boxes = None if deltas is None else box2box.apply_deltas(deltas, proposals)
    return boxes, probs


def fast_rcnn_inference_single_image(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    image_hw: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detectron2's selection: threshold (strict) -> per-class NMS -> top-k by score.

    Returns ``(boxes [K, 4], scores [K], classes [K], proposal_index [K])`` in input pixels, sorted
    by score. Candidates are enumerated proposal-major, class-minor (the reference NMS order).
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
    proposal_ids = torch.arange(len(boxes), device=boxes.device)
    if not valid.all():
        boxes, probs, proposal_ids = boxes[valid], probs[valid], proposal_ids[valid]
    scores = probs[:, :-1]
    num_reg_classes = boxes.shape[1] // 4
    mask = scores > score_thresh
    candidates = mask.nonzero()
    boxes = boxes.reshape(-1, num_reg_classes, 4)
    if num_reg_classes == 1:
        boxes = boxes[candidates[:, 0], 0]
    else:
        boxes = boxes[mask]
    candidates[:, 0] = proposal_ids[candidates[:, 0]]
    return select_candidates(boxes, scores[mask], candidates, image_hw, nms_thresh, topk)


def select_candidates(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    candidates: torch.Tensor,
    image_hw: Tuple[int, int],
    nms_thresh: float,
    topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part of Detectron2's selection after the threshold: clip, per-class NMS, top-k.

    ``boxes [M, 4]`` (decoded, unclipped), ``scores [M]`` and ``candidates [M, 2]`` (proposal
    index, class) of the pairs above the score threshold, proposal-major and class-minor.
    Returns ``(boxes, scores, classes, proposal_index)`` sorted by score.
    """
    boxes = clip_boxes_(boxes, image_hw)  # a new tensor here: indexing copied it
    keep = batched_nms(boxes, scores, candidates[:, 1], nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    candidates = candidates[keep]
    return boxes[keep], scores[keep], candidates[:, 1], candidates[:, 0]
