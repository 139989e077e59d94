"""``GeneralizedRCNN``: normalise -> backbone -> RPN -> ROI heads -> boxes in original pixels.

The module tree and names (``backbone``, ``proposal_generator``, ``roi_heads``) are Detectron2's, so
its checkpoints load without renaming. The model never reads files: it takes uint8 tensors already
decoded and resized by :mod:`gridfeats.data.preprocess`.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from gridfeats.modeling.backbone import build_resnet_backbone
from gridfeats.modeling.roi_heads import Detections, build_roi_heads
from gridfeats.modeling.rpn import RPN
from gridfeats.structures import ImageList, clip_boxes_, nonempty, scale_boxes_


class GeneralizedRCNN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} is not supported"
            )
        if cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone":
            raise ValueError(f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r} is not supported")
        if cfg.MODEL.PROPOSAL_GENERATOR.NAME != "RPN":
            raise ValueError(
                f"MODEL.PROPOSAL_GENERATOR.NAME {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r} is not supported"
            )
        if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS:
            raise ValueError("mask, keypoint and precomputed-proposal models are not supported")
        self.backbone = build_resnet_backbone(cfg)
        shapes = {name: self._shape(name) for name in self.backbone.stage_names}
        self.proposal_generator = RPN(cfg, shapes)
        self.roi_heads = build_roi_heads(cfg, shapes)
        channels = len(cfg.MODEL.PIXEL_MEAN)
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(channels, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(channels, 1, 1), persistent=False
        )

    def _shape(self, name: str) -> Dict[str, int]:
        return {
            "channels": self.backbone._out_channels[name],
            "stride": self.backbone._out_strides[name],
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: Sequence[torch.Tensor]) -> ImageList:
        """``(uint8 - mean) / std`` per channel, then pad to one batch (bottom/right, value 0)."""
        normalised = [
            (img.to(self.device, non_blocking=True) - self.pixel_mean) / self.pixel_std
            for img in images
        ]
        return ImageList.from_tensors(normalised, size_divisibility=0)

    def inference(self, images: ImageList) -> Tuple[Dict[str, torch.Tensor], List[Detections]]:
        """Backbone features and detections in input pixels (before rescaling to the original size)."""
        features = self.backbone(images.tensor)
        proposals = self.proposal_generator(images, features)
        return features, self.roi_heads(features, proposals, images.image_sizes)

    def forward(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[Tuple[int, int]]
    ) -> List[Detections]:
        image_list = self.preprocess(images)
        _, detections = self.inference(image_list)
        return [
            postprocess(d, hw_in, hw_out)[0]
            for d, hw_in, hw_out in zip(detections, image_list.image_sizes, original_sizes)
        ]


def postprocess(
    det: Detections, input_hw: Tuple[int, int], output_hw: Tuple[int, int]
) -> Tuple[Detections, torch.Tensor]:
    """Rescale boxes to the original image (per axis), clip, drop empty ones (``detector_postprocess``).

    Returns the rescaled detections and the boolean mask of the input detections that were kept.
    """
    scale_x = output_hw[1] / input_hw[1]
    scale_y = output_hw[0] / input_hw[0]
    boxes = clip_boxes_(scale_boxes_(det.boxes.clone(), scale_x, scale_y), output_hw)
    keep = nonempty(boxes)
    return Detections(
        boxes[keep], det.scores[keep], det.classes[keep], det.proposal_index[keep]
    ), keep
