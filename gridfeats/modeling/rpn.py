"""Region Proposal Network: Detectron2's ``StandardRPNHead`` and its proposal selection.

Proposals are :class:`~gridfeats.structures.Instances` with ``proposal_boxes`` (network-input
pixels) and ``objectness_logits``, the fields and order Detectron2's ROI heads consume.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.layers import ShapeSpec, batched_nms
from gridfeats.modeling.anchors import DefaultAnchorGenerator, build_anchor_generator
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.structures import ImageList, Instances, clip_boxes_, nonempty


class StandardRPNHead(nn.Module):
    """3x3 conv + ReLU shared by two 1x1 convs: objectness ``[N, A, H, W]``, deltas ``[N, 4A, H, W]``."""

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1, stride=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1, stride=1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        # The two 1x1 predictors run in float32 under a fast-mode autocast too (cheap: 75 output
        # channels), so objectness ties and box deltas are not rounded to bf16 (no-op in fp32).
        with torch.autocast(t.device.type, enabled=False):
            t = t.float()
            return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    """Proposals from one feature level (``in_feature``), selected as Detectron2 does: sort
    logits, keep the top ``pre_nms_topk``, clip, drop empty boxes, NMS, keep ``post_nms_topk``
    (the train or test numbers by ``self.training``). In training it also returns its losses."""

    def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
        super().__init__()
        rpn = cfg.MODEL.RPN
        if len(rpn.IN_FEATURES) != 1:
            raise ValueError("only a single RPN input feature is supported")
        if rpn.HEAD_NAME != "StandardRPNHead":
            raise ValueError(f"MODEL.RPN.HEAD_NAME {rpn.HEAD_NAME!r} is not supported")
        self.in_feature = rpn.IN_FEATURES[0]
        shape = input_shape[self.in_feature]
        self.anchor_generator: DefaultAnchorGenerator = build_anchor_generator(cfg, shape.stride)
        self.rpn_head = StandardRPNHead(shape.channels, self.anchor_generator.num_anchors)
        self.box2box_transform = Box2BoxTransform(rpn.BBOX_REG_WEIGHTS)
        self.pre_nms_topk = {True: rpn.PRE_NMS_TOPK_TRAIN, False: rpn.PRE_NMS_TOPK_TEST}
        self.post_nms_topk = {True: rpn.POST_NMS_TOPK_TRAIN, False: rpn.POST_NMS_TOPK_TEST}
        self.nms_thresh = rpn.NMS_THRESH
        self.min_box_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Proposals per image and, in training mode, ``loss_rpn_cls`` / ``loss_rpn_loc``."""
        x = features[self.in_feature]
        logits, deltas = self.rpn_head(x)
        # Proposal selection sorts and decodes in float32 whatever the compute dtype (a no-op in
        # fp32): bf16 logits would tie and reorder proposals, bf16 deltas move boxes by pixels.
        logits, deltas = logits.float(), deltas.float()
        anchors = self.anchor_generator.grid_anchors(x.shape[-2:])
        n, _, h, w = logits.shape
        a = self.anchor_generator.num_anchors
        # [N, A, H, W] -> [N, H*W*A]; [N, A*4, H, W] -> [N, H*W*A, 4]: aligned with the anchor order.
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        boxes = self.box2box_transform.apply_deltas(deltas, anchors.repeat(n, 1)).view(n, -1, 4)
        proposals = self.select_proposals(boxes, logits, images.image_sizes)
        losses: Dict[str, torch.Tensor] = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("the RPN needs gt_instances in training mode")
            raise NotImplementedError("RPN training losses are not implemented yet")
        return proposals, losses

    @torch.no_grad()
    def select_proposals(
        self, boxes: torch.Tensor, logits: torch.Tensor, image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """Per image, never across the batch (so batching does not change any image's proposals)."""
        pre_topk = min(self.pre_nms_topk[self.training], logits.shape[1])
        post_topk = self.post_nms_topk[self.training]
        sorted_logits, order = logits.sort(descending=True, dim=1)
        results = []
        for i, image_hw in enumerate(image_sizes):
            scores_i = sorted_logits[i, :pre_topk]
            boxes_i = boxes[i, order[i, :pre_topk]]
            valid = torch.isfinite(boxes_i).all(dim=1) & torch.isfinite(scores_i)
            if not valid.all():
                boxes_i, scores_i = boxes_i[valid], scores_i[valid]
            clip_boxes_(boxes_i, image_hw)
            keep = nonempty(boxes_i, self.min_box_size)
            if not keep.all():
                boxes_i, scores_i = boxes_i[keep], scores_i[keep]
            level = torch.zeros(len(boxes_i), dtype=torch.int64, device=boxes_i.device)
            keep = batched_nms(boxes_i, scores_i, level, self.nms_thresh)[:post_topk]
            results.append(
                Instances(image_hw, proposal_boxes=boxes_i[keep], objectness_logits=scores_i[keep])
            )
        return results
