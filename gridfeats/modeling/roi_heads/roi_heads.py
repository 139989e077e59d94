"""The two ROI head types of grid-feats-vqa.

* ``AttributeStandardROIHeads`` (grid configs): 1x1 ROIAlignV2 on dilated res5 -> 2 FC -> predictor.
* ``AttributeRes5ROIHeads`` ("updn" region configs): 14x14 ROIAlignV2 on res4 -> res5 stage ->
  mean pool -> predictor (the C4 design of bottom-up-attention).

Both share the inference logic of :class:`_AttributeROIHeads`, differ in how a box becomes a feature
vector (:meth:`box_features`) and in what the whole-image conv5 map is (:meth:`conv5_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from gridfeats.modeling.backbone.resnet import make_stage
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.modeling.roi_heads.attribute_head import AttributePredictor
from gridfeats.modeling.roi_heads.box_head import FastRCNNConvFCHead
from gridfeats.modeling.roi_heads.fast_rcnn import (
    FastRCNNOutputLayers,
    fast_rcnn_inference_single_image,
    predict_boxes_and_probs,
)
from gridfeats.modeling.roi_heads.pooler import ROIPooler
from gridfeats.modeling.rpn import Proposals


@dataclass
class BoxPredictions:
    """Everything the box branch computed for one image's proposals (before any selection)."""

    proposals: torch.Tensor  # [R, 4] input pixels
    features: torch.Tensor  # [R, D] box-head features (fc7 or pooled res5)
    probs: torch.Tensor  # [R, K + 1] softmax, background last
    boxes: torch.Tensor  # [R, 4K] class-specific decoded boxes, input pixels (unclipped)


@dataclass
class Detections:
    """Selected detections of one image in input pixels, with the proposal each came from."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    proposal_index: torch.Tensor


class _AttributeROIHeads(nn.Module):
    def __init__(self, cfg, input_shape: Dict[str, Dict[str, int]]):
        super().__init__()
        heads = cfg.MODEL.ROI_HEADS
        if len(heads.IN_FEATURES) != 1:
            raise ValueError("only a single ROI_HEADS.IN_FEATURES entry is supported")
        self.in_feature = heads.IN_FEATURES[0]
        self.num_classes = heads.NUM_CLASSES
        self.score_thresh = heads.SCORE_THRESH_TEST
        self.nms_thresh = heads.NMS_THRESH_TEST
        self.detections_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        box = cfg.MODEL.ROI_BOX_HEAD
        self.box2box_transform = Box2BoxTransform(box.BBOX_REG_WEIGHTS)
        self.cls_agnostic_bbox_reg = box.CLS_AGNOSTIC_BBOX_REG
        stride = input_shape[self.in_feature]["stride"]
        self.pooler = ROIPooler(
            box.POOLER_RESOLUTION, 1.0 / stride, box.POOLER_SAMPLING_RATIO, box.POOLER_TYPE
        )
        self.attribute_on = cfg.MODEL.ATTRIBUTE_ON
        self._attr_cfg = cfg.MODEL.ROI_ATTRIBUTE_HEAD

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

    # -- what differs between the two heads ---------------------------------------------------------
    def box_features(
        self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def conv5_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- shared inference --------------------------------------------------------------------------
    def predict(
        self, features: Dict[str, torch.Tensor], proposals: List[Proposals]
    ) -> List[BoxPredictions]:
        """Box features, class probabilities and decoded boxes for every proposal of every image."""
        proposal_boxes = [p.boxes for p in proposals]
        box_feats = self.box_features(features, proposal_boxes)
        logits, deltas = self.box_predictor(box_feats)
        out = []
        start = 0
        for boxes in proposal_boxes:
            end = start + len(boxes)
            decoded, probs = predict_boxes_and_probs(
                logits[start:end], deltas[start:end], boxes, self.box2box_transform
            )
            out.append(BoxPredictions(boxes, box_feats[start:end], probs, decoded))
            start = end
        return out

    def select(
        self, predictions: List[BoxPredictions], image_sizes: List[Tuple[int, int]]
    ) -> List[Detections]:
        """Detectron2's test-time selection (score threshold, per-class NMS, top-k) per image."""
        results = []
        for pred, hw in zip(predictions, image_sizes):
            boxes, scores, classes, index = fast_rcnn_inference_single_image(
                pred.boxes,
                pred.probs,
                hw,
                self.score_thresh,
                self.nms_thresh,
                self.detections_per_image,
            )
            results.append(Detections(boxes, scores, classes, index))
        return results

    def attribute_probs(self, box_feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Softmax over the attribute logits for features of boxes with the given (predicted) classes."""
        if not self.attribute_on:
            raise RuntimeError("this model has no attribute head (MODEL.ATTRIBUTE_ON is False)")
        return torch.softmax(self.attribute_predictor(box_feats, classes), dim=-1)

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Proposals],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Detections]:
        return self.select(self.predict(features, proposals), image_sizes)


class AttributeStandardROIHeads(_AttributeROIHeads):
    """Grid configs: pooled res5 (1x1) -> ``box_head`` (fc1, fc2) -> ``box_predictor``."""

    def __init__(self, cfg, input_shape: Dict[str, Dict[str, int]]):
        super().__init__(cfg, input_shape)
        box = cfg.MODEL.ROI_BOX_HEAD
        if box.NAME != "FastRCNNConvFCHead":
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.NAME {box.NAME!r} is not supported (FastRCNNConvFCHead)"
            )
        self.box_head = FastRCNNConvFCHead(
            input_shape[self.in_feature]["channels"],
            box.POOLER_RESOLUTION,
            box.NUM_CONV,
            box.CONV_DIM,
            box.NUM_FC,
            box.FC_DIM,
            box.NORM,
        )
        self._build_predictors(self.box_head.output_size)

    def box_features(self, features, boxes):
        return self.box_head(self.pooler(features[self.in_feature], boxes))

    def conv5_features(self, features):
        return features[self.in_feature]


class AttributeRes5ROIHeads(_AttributeROIHeads):
    """updn configs: pooled res4 (14x14) -> ``res5`` (3 blocks, stride 2, no dilation) -> mean."""

    def __init__(self, cfg, input_shape: Dict[str, Dict[str, int]]):
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

    def _res5(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res5:
            x = block(x)
        return x

    def box_features(self, features, boxes):
        return self._res5(self.pooler(features[self.in_feature], boxes)).mean(dim=[2, 3])

    def conv5_features(self, features):
        return self._res5(features[self.in_feature])


ROI_HEADS = {
    "AttributeStandardROIHeads": AttributeStandardROIHeads,
    "StandardROIHeads": AttributeStandardROIHeads,
    "AttributeRes5ROIHeads": AttributeRes5ROIHeads,
    "Res5ROIHeads": AttributeRes5ROIHeads,
}


def build_roi_heads(cfg, input_shape: Dict[str, Dict[str, int]]) -> _AttributeROIHeads:
    name = cfg.MODEL.ROI_HEADS.NAME
    if name not in ROI_HEADS:
        raise ValueError(
            f"MODEL.ROI_HEADS.NAME {name!r} is not supported (one of {sorted(ROI_HEADS)})"
        )
    return ROI_HEADS[name](cfg, input_shape)
