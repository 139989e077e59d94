"""Region Proposal Network: Detectron2's ``StandardRPNHead`` + test-time proposal selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.layers import batched_nms
from gridfeats.modeling.anchors import DefaultAnchorGenerator, build_anchor_generator
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.structures import ImageList, clip_boxes_, nonempty


@dataclass
class Proposals:
    """Per-image proposals: ``boxes [R, 4]`` in input pixels and their objectness ``logits [R]``."""

    boxes: torch.Tensor
    logits: torch.Tensor


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
        return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    """Proposals from one feature level (``in_feature``), selected as Detectron2 does at test time:
    sort logits, keep the top ``pre_nms_topk``, clip, drop empty boxes, NMS, keep ``post_nms_topk``."""

    def __init__(self, cfg, input_shape: Dict[str, Dict[str, int]]):
        super().__init__()
        rpn = cfg.MODEL.RPN
        if len(rpn.IN_FEATURES) != 1:
            raise ValueError("only a single RPN input feature is supported")
        if rpn.HEAD_NAME != "StandardRPNHead":
            raise ValueError(f"MODEL.RPN.HEAD_NAME {rpn.HEAD_NAME!r} is not supported")
        self.in_feature = rpn.IN_FEATURES[0]
        shape = input_shape[self.in_feature]
        self.anchor_generator: DefaultAnchorGenerator = build_anchor_generator(cfg, shape["stride"])
        self.rpn_head = StandardRPNHead(shape["channels"], self.anchor_generator.num_anchors)
        self.box2box_transform = Box2BoxTransform(rpn.BBOX_REG_WEIGHTS)
        self.pre_nms_topk = {True: rpn.PRE_NMS_TOPK_TRAIN, False: rpn.PRE_NMS_TOPK_TEST}
        self.post_nms_topk = {True: rpn.POST_NMS_TOPK_TRAIN, False: rpn.POST_NMS_TOPK_TEST}
        self.nms_thresh = rpn.NMS_THRESH
        self.min_box_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor]) -> List[Proposals]:
        x = features[self.in_feature]
        logits, deltas = self.rpn_head(x)
        anchors = self.anchor_generator.grid_anchors(x.shape[-2:])
        n, _, h, w = logits.shape
        a = self.anchor_generator.num_anchors
        # [N, A, H, W] -> [N, H*W*A]; [N, A*4, H, W] -> [N, H*W*A, 4]: aligned with the anchor order.
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        boxes = self.box2box_transform.apply_deltas(deltas, anchors.repeat(n, 1)).view(n, -1, 4)
        return self.select_proposals(boxes, logits, images.image_sizes)

    @torch.no_grad()
    def select_proposals(
        self, boxes: torch.Tensor, logits: torch.Tensor, image_sizes: List[Tuple[int, int]]
    ) -> List[Proposals]:
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
            results.append(Proposals(boxes_i[keep], scores_i[keep]))
        return results
