"""The two ROI head types of grid-feats-vqa.

* ``AttributeStandardROIHeads`` (grid configs): 1x1 ROIAlignV2 on dilated res5 -> 2 FC -> predictor.
* ``AttributeRes5ROIHeads`` ("updn" region configs): 14x14 ROIAlignV2 on res4 -> res5 stage ->
  mean pool -> predictor (the C4 design of bottom-up-attention).

Both share the inference logic of :class:`_AttributeROIHeads`, differ in how a box becomes a feature
vector (:meth:`box_features`) and in what the whole-image conv5 map is (:meth:`conv5_features`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from gridfeats.layers import ShapeSpec
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
from gridfeats.structures import ImageList, Instances


class _AttributeROIHeads(nn.Module):
    def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
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
        stride = input_shape[self.in_feature].stride
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
        self, features: Dict[str, torch.Tensor], proposals: List[Instances]
    ) -> List[Instances]:
        """The box branch on every proposal of every image, before any selection.

        Each result holds the proposals' fields plus ``box_features [R, D]`` (fc7 or pooled res5),
        ``class_probs [R, K + 1]`` (softmax, background last) and ``pred_boxes_per_class
        [R, 4K]`` (decoded class-specific boxes, input pixels, unclipped).
        """
        proposal_boxes = [p.proposal_boxes for p in proposals]
        box_feats = self.box_features(features, proposal_boxes)
        logits, deltas = self.box_predictor(box_feats)
        logits, deltas = logits.float(), deltas.float()  # selection runs in float32 (see RPN)
        out = []
        start = 0
        for image_proposals in proposals:
            end = start + len(image_proposals)
            decoded, probs = predict_boxes_and_probs(
                logits[start:end],
                deltas[start:end],
                image_proposals.proposal_boxes,
                self.box2box_transform,
            )
            result = image_proposals[:]  # a shallow copy: same tensors, new field table
            result.box_features = box_feats[start:end]
            result.class_probs = probs
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
        """Softmax over the attribute logits for features of boxes with the given (predicted) classes."""
        if not self.attribute_on:
            raise RuntimeError("this model has no attribute head (MODEL.ATTRIBUTE_ON is False)")
        return torch.softmax(self.attribute_predictor(box_feats, classes).float(), dim=-1)

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Detections per image (eval) or the box and attribute losses (training)."""
        if self.training:
            if targets is None:
                raise ValueError("the ROI heads need targets in training mode")
            raise NotImplementedError("ROI head training losses are not implemented yet")
        return self.select(self.predict(features, proposals)), {}


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
        return self._res5(self.pooler(features[self.in_feature], boxes)).mean(dim=[2, 3])

    def conv5_features(self, features):
        return self._res5(features[self.in_feature])


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
