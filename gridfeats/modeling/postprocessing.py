"""Detections from network-input pixels to the original image (Detectron2's
``detector_postprocess``)."""

from __future__ import annotations

from typing import Tuple

import torch

from gridfeats.structures import Instances, clip_boxes_, nonempty, scale_boxes_


def detector_postprocess(
    detections: Instances, output_hw: Tuple[int, int]
) -> Tuple[Instances, torch.Tensor]:
    """Rescale ``pred_boxes`` per axis to ``output_hw``, clip, and drop boxes left empty.

    Returns the rescaled detections (a new ``Instances`` of size ``output_hw``; the input is not
    modified) and the boolean mask of the input detections that were kept, so callers can pick the
    same rows in network-input pixels (region features are pooled there).
    """
    boxes = rescale_boxes(detections.pred_boxes, detections.image_size, output_hw)
    keep = nonempty(boxes)
    result = Instances(output_hw, **detections[keep].get_fields())
    result.pred_boxes = boxes[keep]
    return result, keep


def rescale_boxes(
    boxes: torch.Tensor, input_hw: Tuple[int, int], output_hw: Tuple[int, int]
) -> torch.Tensor:
    """Boxes scaled per axis from an ``input_hw`` image to an ``output_hw`` one and clipped to it
    (a new tensor)."""
    scale_x = output_hw[1] / input_hw[1]
    scale_y = output_hw[0] / input_hw[0]
    return clip_boxes_(scale_boxes_(boxes.clone(), scale_x, scale_y), output_hw)
