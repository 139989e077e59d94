"""Region Proposal Network: Detectron2's ``StandardRPNHead``, its proposal selection and losses.

Proposals are :class:`~gridfeats.structures.Instances` with ``proposal_boxes`` (network-input
pixels) and ``objectness_logits``, the fields and order Detectron2's ROI heads consume.

Training (detectron2-compat.md 5.7) follows Detectron2@ffff8ac's ``RPNOutputs``: every anchor of
the padded feature map is matched to the image's ground truth (IoU 0.3 / 0.7, low-quality matches),
anchors not inside the *unpadded* image (``BOUNDARY_THRESH``) are ignored, ``BATCH_SIZE_PER_IMAGE``
anchors are sampled per image in image order (the ``torch.randperm`` draws of a seeded reference
run), and both losses are sums divided by the fixed ``BATCH_SIZE_PER_IMAGE x num_images``.

With per-image ``generators`` (``SOLVER.RANK_INVARIANT``: one per batch item, seeded from its
``"sampling_seed"``) each image's anchors are drawn from its own generator instead. The
normaliser needs no change there: under DDP the gradient average over ranks of
``sum_r / (BATCH_SIZE_PER_IMAGE x images_r)`` with equal per-rank image counts is the one-process
``sum / (BATCH_SIZE_PER_IMAGE x all images)``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fvcore.nn import smooth_l1_loss
from torch import nn

from gridfeats.layers import Conv2d, ShapeSpec
from gridfeats.layers.box_nms import nms_top_k
from gridfeats.modeling.anchors import DefaultAnchorGenerator, build_anchor_generator
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.modeling.matcher import Matcher
from gridfeats.modeling.sampling import subsample_labels
from gridfeats.structures import ImageList, Instances, clip_boxes_, nonempty, pairwise_iou


class StandardRPNHead(nn.Module):
    """3x3 conv + ReLU shared by two 1x1 convs: objectness ``[N, A, H, W]``, deltas
    ``[N, 4A, H, W]``."""

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int = 4):
        super().__init__()
        # gridfeats' Conv2d (no norm): the fast mode's folded / Winograd path applies to it too.
        self.conv = Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
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
        #: Detectron2's order among exactly tied objectness scores (see ``nms_top_k``); the
        #: fast modes set it False (Detector), which skips a full NMS where kept scores tie.
        self.exact_tie_order = True
        self.min_box_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)
        # training
        self.anchor_matcher = Matcher(
            rpn.IOU_THRESHOLDS, rpn.IOU_LABELS, allow_low_quality_matches=True
        )
        self.batch_size_per_image = int(rpn.BATCH_SIZE_PER_IMAGE)
        self.positive_fraction = float(rpn.POSITIVE_FRACTION)
        self.boundary_threshold = rpn.BOUNDARY_THRESH
        self.smooth_l1_beta = float(rpn.SMOOTH_L1_BETA)
        self.loss_weight = float(rpn.LOSS_WEIGHT)
        #: grid-feats-vqa's extra multiplier on ``loss_rpn_loc`` (applied in its ``run_step``)
        self.bbox_loss_weight = float(rpn.get("BBOX_LOSS_WEIGHT", 1.0))

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
        generators: Optional[List[torch.Generator]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Proposals per image and, in training mode, ``loss_rpn_cls`` / ``loss_rpn_loc``
        (anchors sampled from ``generators[i]`` for image i when given, else the global RNG)."""
        x = features[self.in_feature]
        logits, deltas = self.rpn_head(x)
        # Proposal selection sorts and decodes in float32 whatever the compute dtype (a no-op in
        # fp32): bf16 logits would tie and reorder proposals, bf16 deltas move boxes by pixels.
        logits, deltas = logits.float(), deltas.float()
        anchors = self.anchor_generator.grid_anchors(x.shape[-2:])
        n, _, h, w = logits.shape
        a = self.anchor_generator.num_anchors
        # [N, A, H, W] -> [N, H*W*A]; [N, A*4, H, W] -> [N*H*W*A, 4]: in the anchor order.
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        losses: Dict[str, torch.Tensor] = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("the RPN needs gt_instances in training mode")
            gt_boxes = [t.gt_boxes for t in gt_instances]
            losses = self.losses(
                anchors, logits, deltas, gt_boxes, images.image_sizes, generators=generators
            )
        # proposals are constants for the ROI heads (Detectron2's approximate joint training)
        with torch.no_grad():
            boxes = self.box2box_transform.apply_deltas(deltas, anchors.repeat(n, 1)).view(n, -1, 4)
            proposals = self.select_proposals(boxes, logits, images.image_sizes)
        return proposals, losses

    @torch.no_grad()
    def label_and_sample_anchors(
        self,
        anchors: torch.Tensor,
        gt_boxes: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
        generators: Optional[List[torch.Generator]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Objectness targets ``[N, A]`` (int8: 1 sampled positive, 0 sampled negative, -1 unused)
        and regression targets ``[N, A, 4]`` (each anchor to its best gt; zeros without gt).

        Images are sampled one after another, positives before negatives, as Detectron2 does
        (from the global RNG, or from ``generators[i]`` for image i).
        """
        if generators is not None and len(generators) != len(gt_boxes):
            raise ValueError(f"{len(generators)} sampling generators for {len(gt_boxes)} images")
        labels, targets = [], []
        for i, (boxes_i, image_hw) in enumerate(zip(gt_boxes, image_sizes)):
            labels_i, matched = label_anchors(
                anchors, boxes_i, image_hw, self.anchor_matcher, self.boundary_threshold
            )
            if len(boxes_i) == 0:
                targets.append(torch.zeros_like(anchors))
            else:
                targets.append(self.box2box_transform.get_deltas(anchors, boxes_i[matched]))
            pos_idx, neg_idx = subsample_labels(
                labels_i,
                self.batch_size_per_image,
                self.positive_fraction,
                0,
                generator=None if generators is None else generators[i],
            )
            labels_i.fill_(-1)
            labels_i.scatter_(0, pos_idx, 1)
            labels_i.scatter_(0, neg_idx, 0)
            labels.append(labels_i)
        return torch.stack(labels), torch.stack(targets)

    def losses(
        self,
        anchors: torch.Tensor,
        pred_logits: torch.Tensor,
        pred_deltas: torch.Tensor,
        gt_boxes: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
        generators: Optional[List[torch.Generator]] = None,
    ) -> Dict[str, torch.Tensor]:
        """``loss_rpn_cls`` and ``loss_rpn_loc`` of the batch; ``pred_logits [N, A]`` and
        ``pred_deltas [N * A, 4]`` in anchor order, image-major."""
        labels, targets = self.label_and_sample_anchors(
            anchors, gt_boxes, image_sizes, generators=generators
        )
        objectness, localization = rpn_losses(
            labels.flatten(),
            targets.reshape(-1, 4),
            pred_logits.flatten(),
            pred_deltas,
            self.smooth_l1_beta,
        )
        normalizer = 1.0 / (self.batch_size_per_image * len(image_sizes))
        return {
            "loss_rpn_cls": objectness * normalizer * self.loss_weight,
            "loss_rpn_loc": localization * normalizer * self.loss_weight * self.bbox_loss_weight,
        }

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
                if self.training:
                    raise FloatingPointError(
                        "predicted RPN boxes or scores contain Inf/NaN: training has diverged"
                    )
                boxes_i, scores_i = boxes_i[valid], scores_i[valid]
            clip_boxes_(boxes_i, image_hw)
            keep = nonempty(boxes_i, self.min_box_size)
            if not keep.all():
                boxes_i, scores_i = boxes_i[keep], scores_i[keep]
            # One feature level (C4): Detectron2's batched_nms is the plain kernel here, and only
            # its first post_topk kept boxes are used.
            keep = nms_top_k(boxes_i, scores_i, self.nms_thresh, post_topk, self.exact_tie_order)
            results.append(
                Instances(image_hw, proposal_boxes=boxes_i[keep], objectness_logits=scores_i[keep])
            )
        return results


def label_anchors(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    image_hw: Tuple[int, int],
    matcher: Matcher,
    boundary_threshold: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(labels int8 [A], matched gt index [A])`` for one image, before sampling.

    ``boundary_threshold = t >= 0``: anchors reaching more than ``t`` pixels outside the unpadded
    ``image_hw`` (not ``x0 >= -t``, ``y0 >= -t``, ``x1 < w + t``, ``y1 < h + t``) are ignored,
    low-quality positives included; a negative value keeps every anchor.
    """
    matched, labels = matcher(pairwise_iou(gt_boxes, anchors))
    labels = labels.to(device=gt_boxes.device)
    if boundary_threshold >= 0:
        h, w = image_hw
        t = boundary_threshold
        inside = (
            (anchors[:, 0] >= -t)
            & (anchors[:, 1] >= -t)
            & (anchors[:, 2] < w + t)
            & (anchors[:, 3] < h + t)
        )
        labels[~inside] = -1
    return labels, matched


def rpn_losses(
    gt_labels: torch.Tensor,
    gt_deltas: torch.Tensor,
    pred_logits: torch.Tensor,
    pred_deltas: torch.Tensor,
    smooth_l1_beta: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised ``(objectness, localization)`` sums: sigmoid BCE over anchors labelled 0 or 1,
    smooth-L1 over the 4 deltas of anchors labelled 1."""
    pos = gt_labels == 1
    localization = smooth_l1_loss(pred_deltas[pos], gt_deltas[pos], smooth_l1_beta, reduction="sum")
    valid = gt_labels >= 0
    objectness = F.binary_cross_entropy_with_logits(
        pred_logits[valid], gt_labels[valid].to(torch.float32), reduction="sum"
    )
    return objectness, localization
