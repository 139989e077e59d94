"""The train-time mapper: record -> ``{"image", "instances", ...}`` for ``GeneralizedRCNN.forward``
(``instances``: :class:`~gridfeats.structures.Instances` with ``gt_boxes``, ``gt_classes`` and,
with ``MODEL.ATTRIBUTE_ON``, ``gt_attributes [N, MAX_ATTR_PER_INS]`` padded with -1).

grid-feats-vqa's ``AttributeDatasetMapper`` with Detectron2's train transforms
(detectron2-compat.md 2.3): the project's one reader (:func:`read_image`), the one resize
(:func:`prepare_rgb`, i.e. ``ResizeShortestEdge`` with a short side drawn from
``INPUT.MIN_SIZE_TRAIN`` by ``MIN_SIZE_TRAIN_SAMPLING``), then a horizontal flip with probability
0.5. Boxes follow in float64 (``XYWH`` -> ``XYXY``, per-axis scale, ``x -> W - x``), become float32,
are clipped to the resized image, and objects whose box is then empty are dropped together with
their class and attribute rows. Crowd objects are dropped first.

Randomness comes from the ``rng`` argument rather than a global generator, so a sample's
augmentation is a function of where it sits in the training stream: the same in any DataLoader
worker and after ``--resume``.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np
import torch

from gridfeats.data.detection_dataset import DetectionDatasetError
from gridfeats.data.image_io import read_image
from gridfeats.data.preprocess import prepare_rgb
from gridfeats.structures import Instances

SAMPLE_STYLES = ("choice", "range")


class DetectionTrainMapper:
    """Callable ``mapper(record, rng) -> dict``; see the module docstring."""

    def __init__(
        self,
        min_sizes: Sequence[int],
        max_size: int,
        sample_style: str = "choice",
        flip_prob: float = 0.5,
        input_format: str = "BGR",
        attribute_on: bool = True,
        max_attr_per_ins: int = 16,
    ):
        if sample_style not in SAMPLE_STYLES:
            raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be one of {SAMPLE_STYLES}")
        min_sizes = [int(s) for s in min_sizes]
        if sample_style == "range" and len(min_sizes) != 2:
            raise ValueError(
                f"'range' sampling needs INPUT.MIN_SIZE_TRAIN = (lo, hi), got {min_sizes}"
            )
        if not min_sizes:
            raise ValueError("INPUT.MIN_SIZE_TRAIN is empty")
        self.min_sizes = min_sizes
        self.max_size = int(max_size)
        self.sample_style = sample_style
        self.flip_prob = float(flip_prob)
        self.input_format = input_format
        self.attribute_on = attribute_on
        self.max_attr_per_ins = int(max_attr_per_ins)

    @classmethod
    def from_config(cls, cfg) -> "DetectionTrainMapper":
        if cfg.INPUT.CROP.ENABLED:
            raise ValueError("INPUT.CROP is not supported for detector training")
        return cls(
            cfg.INPUT.MIN_SIZE_TRAIN,
            cfg.INPUT.MAX_SIZE_TRAIN,
            cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            input_format=cfg.INPUT.FORMAT,
            attribute_on=cfg.MODEL.ATTRIBUTE_ON,
            max_attr_per_ins=cfg.INPUT.MAX_ATTR_PER_INS,
        )

    def sample_short_side(self, rng: np.random.Generator) -> int:
        if self.sample_style == "range":
            return int(rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
        return int(rng.choice(self.min_sizes))

    def __call__(self, record: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
        rgb = read_image(record["file_name"])
        h, w = rgb.shape[:2]
        if (record.get("height", h), record.get("width", w)) != (h, w):
            raise DetectionDatasetError(
                f"image is {w}x{h} but the json says {record['width']}x{record['height']}",
                str(record["file_name"]),
            )
        short = self.sample_short_side(rng)
        # short side 0 means "no resize" in Detectron2; prepare_rgb keeps the size for <= 0
        prepared = prepare_rgb(rgb, short, self.max_size, self.input_format)
        newh, neww = prepared.input_hw
        flip = bool(rng.uniform() < self.flip_prob)
        image = prepared.image.flip(-1).contiguous() if flip else prepared.image

        objs = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
        boxes = transform_boxes(
            np.array([a["bbox"] for a in objs], dtype=np.float64).reshape(-1, 4),
            (h, w),
            (newh, neww),
            flip,
        )
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=neww)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=newh)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        instances = Instances(
            (newh, neww),
            gt_boxes=boxes[keep],
            gt_classes=torch.tensor([a["category_id"] for a in objs], dtype=torch.int64)[keep],
        )
        if self.attribute_on:
            attributes = torch.full((len(objs), self.max_attr_per_ins), -1, dtype=torch.int64)
            for i, a in enumerate(objs):
                ids = a.get("attribute_ids") or []
                if len(ids) > self.max_attr_per_ins:
                    raise DetectionDatasetError(
                        f"{len(ids)} attribute_ids > INPUT.MAX_ATTR_PER_INS",
                        str(record["file_name"]),
                    )
                attributes[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
            instances.gt_attributes = attributes[keep]
        return {
            "file_name": record["file_name"],
            "image_id": record.get("image_id"),
            "height": h,
            "width": w,
            "image": image,
            "instances": instances,
        }


def transform_boxes(
    boxes_xywh: np.ndarray, orig_hw: Sequence[int], new_hw: Sequence[int], flip: bool
) -> np.ndarray:
    """``[N, 4]`` float64 ``XYWH`` boxes of the original image -> ``XYXY`` of the resized (and
    horizontally flipped) image, in Detectron2's float64 order of operations."""
    b = boxes_xywh.astype(np.float64, copy=True)
    b[:, 2] += b[:, 0]
    b[:, 3] += b[:, 1]
    (h, w), (newh, neww) = orig_hw, new_hw
    b[:, 0::2] = b[:, 0::2] * (neww * 1.0 / w)
    b[:, 1::2] = b[:, 1::2] * (newh * 1.0 / h)
    if flip:
        x0 = neww - b[:, 2]
        x1 = neww - b[:, 0]
        b[:, 0], b[:, 2] = x0, x1
    return b
