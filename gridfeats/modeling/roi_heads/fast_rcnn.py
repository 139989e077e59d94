"""Box classification/regression layers and Detectron2's test-time detection selection."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from gridfeats.layers import batched_nms
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.structures import clip_boxes_


class FastRCNNOutputLayers(nn.Module):
    """``cls_score``: K+1 logits, **background last**; ``bbox_pred``: 4 deltas per foreground class."""

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
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        # Always float32, also under a bf16/fp16 autocast: these logits decide thresholds, NMS
        # order and classes, and bf16's 8-bit mantissa would tie or reorder them (a no-op in fp32).
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return self.cls_score(x), self.bbox_pred(x)


def predict_boxes_and_probs(
    logits: torch.Tensor, deltas: torch.Tensor, proposals: torch.Tensor, box2box: Box2BoxTransform
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities ``[R, K+1]`` and decoded class-specific boxes ``[R, 4K]`` for one image."""
    probs = torch.softmax(logits, dim=-1)
    boxes = box2box.apply_deltas(deltas, proposals)
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

    Returns ``(boxes [K, 4], scores [K], classes [K], proposal_index [K])`` in input pixels, sorted by
    score. Candidates are enumerated proposal-major, class-minor, the order the reference NMS sees.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
    proposal_ids = torch.arange(len(boxes), device=boxes.device)
    if not valid.all():
        boxes, probs, proposal_ids = boxes[valid], probs[valid], proposal_ids[valid]
    scores = probs[:, :-1]
    num_reg_classes = boxes.shape[1] // 4
    boxes = clip_boxes_(boxes.reshape(-1, 4), image_hw).view(-1, num_reg_classes, 4)
    mask = scores > score_thresh
    candidates = mask.nonzero()
    if num_reg_classes == 1:
        boxes = boxes[candidates[:, 0], 0]
    else:
        boxes = boxes[mask]
    scores = scores[mask]
    keep = batched_nms(boxes, scores, candidates[:, 1], nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    candidates = candidates[keep]
    return boxes[keep], scores[keep], candidates[:, 1], proposal_ids[candidates[:, 0]]
