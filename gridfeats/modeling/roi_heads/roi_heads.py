"""The two ROI head types of grid-feats-vqa.

* ``AttributeStandardROIHeads`` (grid configs): 1x1 ROIAlignV2 on dilated res5 -> 2 FC -> predictor.
* ``AttributeRes5ROIHeads`` ("updn" region configs): 14x14 ROIAlignV2 on res4 -> res5 stage ->
  mean pool -> predictor (the C4 design of bottom-up-attention).

Both share the inference and training logic of :class:`_AttributeROIHeads`, differ in how a box
becomes a feature vector (:meth:`box_features`) and in what the whole-image conv5 map is
(:meth:`conv5_features`).

Training (detectron2-compat.md 6.7, 7.3) is Detectron2@ffff8ac's ``ROIHeads`` plus grid-feats-vqa's
``AttributeROIHeads``: gt boxes appended to the proposals, IoU-0.5 matching without low-quality
matches, ``BATCH_SIZE_PER_IMAGE`` / ``POSITIVE_FRACTION`` sampling per image (image order, the
seeded reference's ``torch.randperm`` draws), ``loss_cls`` + ``loss_box_reg`` on every sampled
proposal and ``loss_attr`` on the foreground ones with their gt class fed to the class embedding.

``SOLVER.RANK_INVARIANT`` (gridfeats' own key; off = the above, unchanged): each image's proposals
are drawn from its own generator (see :meth:`_AttributeROIHeads.label_and_sample_proposals`), and
the three normalisers (sampled proposals for ``loss_cls`` / ``loss_box_reg``, attributed
foreground rows for ``loss_attr``) are counted over all ranks, the losses multiplied by the world
size, so that DDP's gradient average (and the rank average of the logged losses) is the one
process's with the same global batch.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from gridfeats.layers import ShapeSpec
from gridfeats.modeling.backbone.resnet import make_stage
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.modeling.matcher import Matcher
from gridfeats.modeling.roi_heads.attribute_head import AttributePredictor, attribute_loss
from gridfeats.modeling.roi_heads.box_head import FastRCNNConvFCHead
from gridfeats.modeling.roi_heads.fast_rcnn import (
    FastRCNNOutputLayers,
    fast_rcnn_inference_single_image,
    fast_rcnn_losses,
    predict_boxes_and_probs,
    select_candidates,
)
from gridfeats.modeling.roi_heads.pooler import ROIPooler
from gridfeats.modeling.sampling import subsample_labels
from gridfeats.structures import ImageList, Instances, pairwise_iou

#: Objectness logit given to gt boxes appended to the proposals: logit(1 - 1e-10), as Detectron2.
GT_PROPOSAL_LOGIT = math.log((1.0 - 1e-10) / (1 - (1.0 - 1e-10)))
REGIONS_PER_RES5_CALL = 48  # updn's per-region res5 at inference (see box_features)


class _AttributeROIHeads(nn.Module):
    def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
        super().__init__()
        heads = cfg.MODEL.ROI_HEADS
        if len(heads.IN_FEATURES) != 1:
            raise ValueError("only a single ROI_HEADS.IN_FEATURES entry is supported")
        self.in_feature = heads.IN_FEATURES[0]
        self.num_classes = heads.NUM_CLASSES
        self.score_thresh = heads.SCORE_THRESH_TEST
        self.sparse_box_deltas = False  # the fast mode's detect_sparse (set by Detector)
        self.nms_thresh = heads.NMS_THRESH_TEST
        self.detections_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        box = cfg.MODEL.ROI_BOX_HEAD
        self.box2box_transform = Box2BoxTransform(box.BBOX_REG_WEIGHTS)
        self.cls_agnostic_bbox_reg = box.CLS_AGNOSTIC_BBOX_REG
        stride = input_shape[self.in_feature].stride
        self.pooler = ROIPooler(
            box.POOLER_RESOLUTION, 1.0 / stride, box.POOLER_SAMPLING_RATIO, box.POOLER_TYPE
        )
        self.attribute_on = cfg.MODEL.ATTRIBUTE_ON
        self._attr_cfg = cfg.MODEL.ROI_ATTRIBUTE_HEAD
        # training
        if box.TRAIN_ON_PRED_BOXES:
            raise ValueError("MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported")
        self.proposal_matcher = Matcher(
            heads.IOU_THRESHOLDS, heads.IOU_LABELS, allow_low_quality_matches=False
        )
        self.batch_size_per_image = int(heads.BATCH_SIZE_PER_IMAGE)
        self.positive_fraction = float(heads.POSITIVE_FRACTION)
        self.proposal_append_gt = bool(heads.PROPOSAL_APPEND_GT)
        self.smooth_l1_beta = float(box.SMOOTH_L1_BETA)
        #: grid-feats-vqa's extra multiplier on ``loss_box_reg`` (applied in its ``run_step``)
        self.bbox_loss_weight = float(box.get("BBOX_LOSS_WEIGHT", 1.0))
        self.attr_loss_weight = float(self._attr_cfg.LOSS_WEIGHT) if self.attribute_on else 0.0
        self.max_attr_per_ins = int(cfg.INPUT.get("MAX_ATTR_PER_INS", 16))
        #: normalise the losses over all ranks' counts (``SOLVER.RANK_INVARIANT``)
        self.rank_invariant = bool(cfg.SOLVER.get("RANK_INVARIANT", False))

    def _build_predictors(self, feature_dim: int) -> None:
        self.box_predictor = FastRCNNOutputLayers(
            feature_dim, self.num_classes, self.cls_agnostic_bbox_reg
        )
        if self.attribute_on:
            a = self._attr_cfg
            self.attribute_predictor = AttributePredictor(
                feature_dim, self.num_classes, a.NUM_CLASSES, a.OBJ_EMBED_DIM, a.FC_DIM
            )
        self.feature_dim = feature_dim

    # -- what differs between the two heads -------------------------------------------------------
    def box_features(
        self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def conv5_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- shared inference --------------------------------------------------------------------------
    def predict(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        class_boxes: bool = True,
    ) -> List[Instances]:
        """The box branch on every proposal of every image, before any selection.

        Each result holds the proposals' fields plus ``box_features [R, D]`` (fc7 or pooled res5),
        ``class_probs [R, K + 1]`` (softmax, background last) and, unless ``class_boxes`` is
        False, ``pred_boxes_per_class [R, 4K]`` (decoded class-specific boxes, input pixels,
        unclipped); without them the box-delta layer is not run at all.
        """
        box_feats = self.box_features(features, [p.proposal_boxes for p in proposals])
        return self._predict_from_box_features(box_feats, proposals, class_boxes)

    def _predict_from_box_features(
        self, box_feats: torch.Tensor, proposals: List[Instances], class_boxes: bool = True
    ) -> List[Instances]:
        """:meth:`predict` after ``box_features``: the predictor and the per-image decoding."""
        if class_boxes:
            logits, deltas = self.box_predictor(box_feats)
            deltas = deltas.float()
        else:
            logits, deltas = self.box_predictor.class_logits(box_feats), None
        logits = logits.float()  # selection runs in float32 (see RPN)
        out = []
        start = 0
        for image_proposals in proposals:
            end = start + len(image_proposals)
            result = image_proposals[:]  # a shallow copy: same tensors, new field table
            result.box_features = box_feats[start:end]
            decoded, result.class_probs = predict_boxes_and_probs(
                logits[start:end],
                None if deltas is None else deltas[start:end],
                image_proposals.proposal_boxes,
                self.box2box_transform,
            )
            if decoded is not None:
                result.pred_boxes_per_class = decoded
            out.append(result)
            start = end
        return out

    def select(self, predictions: List[Instances]) -> List[Instances]:
        """Detectron2's test-time selection (score threshold, per-class NMS, top-k) per image.

        Detections carry ``pred_boxes`` (input pixels), ``scores``, ``pred_classes`` and
        ``proposal_index`` (the proposal each came from).
        """
        results = []
        for pred in predictions:
            boxes, scores, classes, index = fast_rcnn_inference_single_image(
                pred.pred_boxes_per_class,
                pred.class_probs,
                pred.image_size,
                self.score_thresh,
                self.nms_thresh,
                self.detections_per_image,
            )
            results.append(
                Instances(
                    pred.image_size,
                    pred_boxes=boxes,
                    scores=scores,
                    pred_classes=classes,
                    proposal_index=index,
                )
            )
        return results

    def attribute_probs(self, box_feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Softmax over the attribute logits of box features with the given (predicted) classes."""
        if not self.attribute_on:
            raise RuntimeError("this model has no attribute head (MODEL.ATTRIBUTE_ON is False)")
        return torch.softmax(self.attribute_predictor(box_feats, classes).float(), dim=-1)

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
        generators: Optional[List[torch.Generator]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Detections per image (eval), or the sampled proposals (with their ``gt_*`` fields) and
        ``loss_cls``, ``loss_box_reg``, ``loss_attr`` (training; proposals sampled from
        ``generators[i]`` for image i when given, else the global RNG)."""
        if self.training:
            if targets is None:
                raise ValueError("the ROI heads need targets in training mode")
            if generators is None:
                sampled = self.label_and_sample_proposals(proposals, targets)
            else:
                sampled = self.label_and_sample_proposals(proposals, targets, generators)
            return sampled, self.losses(features, sampled)
        if self.sparse_box_deltas:
            return self.detect_sparse(features, proposals), {}
        return self.select(self.predict(features, proposals)), {}

    def detect_sparse(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances]
    ) -> List[Instances]:
        """:meth:`select` of :meth:`predict`, with class-specific box deltas computed only for the
        (proposal, class) pairs above the score threshold.

        Why: the dense ``bbox_pred`` is ``[R, 4K]`` for K = 1600 classes (13 GFLOP on 1000
        proposals, more than the two box-head FC layers), and Detectron2's rule decodes only the
        boxes whose class score passes ``SCORE_THRESH_TEST``. The same candidates, order, NMS and
        top-k as the dense path; the deltas differ by float rounding (dot products summed in
        another order), so this is the fast mode's (``Detector(fast=True)`` sets
        ``sparse_box_deltas``). Falls back to the dense path for class-agnostic regression or
        when more than 4 pairs per proposal pass.
        """
        pooled = self.box_features(features, [p.proposal_boxes for p in proposals])
        predictor = self.box_predictor
        num_classes = predictor.num_classes
        if predictor.bbox_pred.out_features != 4 * num_classes:
            return self.select(self._predict_from_box_features(pooled, proposals))
        box_feats = torch.flatten(pooled, start_dim=1) if pooled.dim() > 2 else pooled
        with torch.autocast(box_feats.device.type, enabled=False):
            box_feats = box_feats.float()
            logits = predictor.cls_score(box_feats)
        weight = predictor.bbox_pred.weight.view(num_classes, 4, -1)
        bias = predictor.bbox_pred.bias.view(num_classes, 4)
        results = []
        start = 0
        for image_proposals in proposals:
            end = start + len(image_proposals)
            scores = torch.softmax(logits[start:end], dim=-1)[:, :-1]
            mask = scores > self.score_thresh
            candidates = mask.nonzero()  # proposal-major, class-minor, as the dense path
            if len(candidates) > 4 * (end - start):  # dense, on the features pooled above
                dense = self._predict_from_box_features(pooled[start:end], [image_proposals])
                results.extend(self.select(dense))
                start = end
                continue
            rows, classes = candidates[:, 0], candidates[:, 1]
            feats = box_feats[start:end][rows]
            with torch.autocast(feats.device.type, enabled=False):  # float32, as the predictor
                deltas = torch.einsum("md,mkd->mk", feats, weight[classes].float())
                deltas = deltas + bias[classes].float()
            boxes = self.box2box_transform.apply_deltas(
                deltas, image_proposals.proposal_boxes[rows]
            )
            boxes, kept_scores, kept_classes, index = select_candidates(
                boxes,
                scores[mask],
                candidates,
                image_proposals.image_size,
                self.nms_thresh,
                self.detections_per_image,
            )
            results.append(
                Instances(
                    image_proposals.image_size,
                    pred_boxes=boxes,
                    scores=kept_scores,
                    pred_classes=kept_classes,
                    proposal_index=index,
                )
            )
            start = end
        return results

    # -- training ----------------------------------------------------------------------------------
    @torch.no_grad()
    def label_and_sample_proposals(
        self,
        proposals: List[Instances],
        targets: List[Instances],
        generators: Optional[List[torch.Generator]] = None,
    ) -> List[Instances]:
        """Per image: append the gt boxes, match, sample; each sampled proposal gets ``gt_classes``
        (background = ``NUM_CLASSES``) and its matched gt's ``gt_boxes`` / ``gt_attributes``.

        Sampled proposals are ordered foreground (draw order), then background (draw order). The
        draws come from the global RNG, or from ``generators[i]`` for image i.
        """
        if generators is not None and len(generators) != len(targets):
            raise ValueError(f"{len(generators)} sampling generators for {len(targets)} images")
        out = []
        for i, (props, target) in enumerate(zip(proposals, targets)):
            gt_boxes = target.gt_boxes
            boxes = props.proposal_boxes
            if self.proposal_append_gt:
                boxes = torch.cat([boxes, gt_boxes.to(boxes.dtype)])
            matched, match_labels = self.proposal_matcher(pairwise_iou(gt_boxes, boxes))
            has_gt = len(target) > 0
            if has_gt:
                gt_classes = target.gt_classes[matched]
                gt_classes[match_labels == 0] = self.num_classes
                gt_classes[match_labels == -1] = -1
            else:
                gt_classes = torch.zeros_like(matched) + self.num_classes
            if generators is None:
                fg_idx, bg_idx = subsample_labels(
                    gt_classes, self.batch_size_per_image, self.positive_fraction, self.num_classes
                )
            else:
                fg_idx, bg_idx = subsample_labels(
                    gt_classes,
                    self.batch_size_per_image,
                    self.positive_fraction,
                    self.num_classes,
                    generator=generators[i],
                )
            idx = torch.cat([fg_idx, bg_idx])
            sampled = Instances(props.image_size, proposal_boxes=boxes[idx])
            sampled.gt_classes = gt_classes[idx]
            if has_gt:
                sampled_targets = matched[idx]
                for name, value in target.get_fields().items():
                    if name.startswith("gt_") and not sampled.has(name):
                        sampled.set(name, value[sampled_targets])
            else:  # only background: zero boxes; attribute rows are never read for background
                sampled.gt_boxes = boxes.new_zeros((len(idx), 4))
                if self.attribute_on:
                    sampled.gt_attributes = torch.full(
                        (len(idx), self.max_attr_per_ins), -1, dtype=torch.int64, device=idx.device
                    )
            out.append(sampled)
        return out

    def losses(
        self, features: Dict[str, torch.Tensor], sampled: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """The box-branch losses (and ``loss_attr``) of sampled proposals, weighted per config.

        With ``rank_invariant`` the normalisers are all ranks' counts divided by the world size
        (see the module docstring); one ``all_reduce`` of two integers per step under DDP.
        """
        box_feats = self.box_features(features, [p.proposal_boxes for p in sampled])
        logits, deltas = self.box_predictor(box_feats)
        gt_classes = torch.cat([p.gt_classes for p in sampled])
        fg = (gt_classes != -1) & (gt_classes != self.num_classes)
        labels = torch.cat([p.gt_attributes for p in sampled])[fg] if self.attribute_on else None
        box_normalizer = attr_normalizer = None
        if self.rank_invariant:
            box_normalizer, attr_normalizer = rank_invariant_normalizers(
                gt_classes.numel(), 0 if labels is None else attributed_rows(labels)
            )
        losses = fast_rcnn_losses(
            logits,
            deltas,
            torch.cat([p.proposal_boxes for p in sampled]),
            torch.cat([p.gt_boxes for p in sampled]),
            gt_classes,
            self.box2box_transform,
            self.smooth_l1_beta,
            normalizer=box_normalizer,
        )
        losses["loss_box_reg"] = losses["loss_box_reg"] * self.bbox_loss_weight
        if self.attribute_on:
            attr_logits = self.attribute_predictor(box_feats[fg], gt_classes[fg])
            losses["loss_attr"] = attribute_loss(
                attr_logits, labels, self.attr_loss_weight, normalizer=attr_normalizer
            )
        return losses


def attributed_rows(labels: torch.Tensor) -> int:
    """Rows of ``labels [n, W]`` (padded with -1) with at least one attribute: ``n_valid``."""
    return int(((labels >= 0).sum(dim=1) > 0).sum())


def rank_invariant_normalizers(num_proposals: int, num_attributed: int) -> Tuple[float, float]:
    """``(proposals, attributed rows)`` summed over all ranks and divided by the world size.

    Dividing a rank's loss sum by ``total / world_size`` multiplies the all-rank mean by the world
    size, which DDP's gradient average (and the logged average) divides out again. One process
    (or no process group): the counts themselves.
    """
    from gridfeats.engine import distributed

    world = distributed.group_world_size()
    if world == 1:
        return float(num_proposals), float(num_attributed)
    proposals, attributed = distributed.sum_over_ranks([num_proposals, num_attributed])
    return proposals / world, attributed / world


class AttributeStandardROIHeads(_AttributeROIHeads):
    """Grid configs: pooled res5 (1x1) -> ``box_head`` (fc1, fc2) -> ``box_predictor``."""

    def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
        super().__init__(cfg, input_shape)
        box = cfg.MODEL.ROI_BOX_HEAD
        if box.NAME != "FastRCNNConvFCHead":
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.NAME {box.NAME!r} is not supported (FastRCNNConvFCHead)"
            )
        self.box_head = FastRCNNConvFCHead(
            input_shape[self.in_feature].channels,
            box.POOLER_RESOLUTION,
            box.NUM_CONV,
            box.CONV_DIM,
            box.NUM_FC,
            box.FC_DIM,
            box.NORM,
        )
        self._build_predictors(self.box_head.output_size)
        #: channels of the whole-image map :meth:`conv5_features` returns (the grid features)
        self.grid_dim = input_shape[self.in_feature].channels

    def box_features(self, features, boxes):
        return self.box_head(self.pooler(features[self.in_feature], boxes))

    def conv5_features(self, features):
        return features[self.in_feature]


class AttributeRes5ROIHeads(_AttributeROIHeads):
    """updn configs: pooled res4 (14x14) -> ``res5`` (3 blocks, stride 2, no dilation) -> mean."""

    def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
        super().__init__(cfg, input_shape)
        r = cfg.MODEL.RESNETS
        if r.DEFORM_ON_PER_STAGE[-1]:
            raise ValueError("a deformable res5 is not supported in the Res5 ROI head")
        bottleneck = r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8
        out_channels = r.RES2_OUT_CHANNELS * 8
        self.res5 = make_stage(
            3,
            out_channels // 2,
            out_channels,
            bottleneck,
            first_stride=2,
            num_groups=r.NUM_GROUPS,
            norm=r.NORM,
            stride_in_1x1=r.STRIDE_IN_1X1,
        )
        self._build_predictors(out_channels)
        self.grid_dim = out_channels

    def _res5(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res5:
            x = block(x)
        return x

    def box_features(self, features, boxes):
        feature = features[self.in_feature]
        if torch.is_grad_enabled() or sum(len(b) for b in boxes) <= REGIONS_PER_RES5_CALL:
            return self._res5(self.pooler(feature, boxes)).mean(dim=[2, 3])
        # Inference pools and runs res5 a few dozen regions at a time: each region's result is
        # the same (batch-invariant kernels; tested), and 1000 regions at once make 400 MB
        # activations per layer that oneDNN's NCHW kernels reorder out of cache (updn's 1000
        # proposals: 10.3 s at once, 7.1-7.5 s in chunks of 16-64, 2 threads; peak memory
        # falls by about 2 GB).
        parts = [
            self._res5(self.pooler(feature[i : i + 1], [image_boxes[start:stop]])).mean(dim=[2, 3])
            for i, image_boxes in enumerate(boxes)
            for start, stop in _chunks(len(image_boxes), REGIONS_PER_RES5_CALL)
        ]
        return torch.cat(parts)

    def conv5_features(self, features):
        return self._res5(features[self.in_feature])


def _chunks(total: int, size: int) -> List[Tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


ROI_HEADS = {
    "AttributeStandardROIHeads": AttributeStandardROIHeads,
    "StandardROIHeads": AttributeStandardROIHeads,
    "AttributeRes5ROIHeads": AttributeRes5ROIHeads,
    "Res5ROIHeads": AttributeRes5ROIHeads,
}


def build_roi_heads(cfg, input_shape: Dict[str, ShapeSpec]) -> _AttributeROIHeads:
    name = cfg.MODEL.ROI_HEADS.NAME
    if name not in ROI_HEADS:
        raise ValueError(
            f"MODEL.ROI_HEADS.NAME {name!r} is not supported (one of {sorted(ROI_HEADS)})"
        )
    return ROI_HEADS[name](cfg, input_shape)
