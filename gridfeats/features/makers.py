"""Prepared images in, feature-store records out: the model side of extraction and the service.

:class:`FeatureSpec` says what to compute for an image; :func:`make_feature_maker` turns it into
one of two makers with one interface (``mode``, ``feature_dim``, ``attr_topk``, ``settings()`` and
``records(prepared)``), so the run loop does not care which features it extracts.

How a batch meets the model is the :class:`~gridfeats.api.Detector`'s policy: one forward per image
by default, because CPU (oneDNN) and GPU (cuDNN) kernels pick different algorithms for different
batch sizes and the store promises the same rows whatever the batch size (on a CPU, batching
600x1000 images buys nothing); ``Detector(batch_forward=True)`` groups same-size images instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from gridfeats.data.preprocess import PreparedImage
from gridfeats.features.selection import (
    BottomUpSettings,
    bottom_up_regions,
    detectron2_regions,
    top_attributes,
)
from gridfeats.store.records import Record, grid_record, region_record
from gridfeats.structures import Instances


class GridFeatureMaker:
    """grid-feats-vqa's C5 grid per image, optionally average-pooled to a fixed ``h x w``."""

    mode = "grid"
    attr_topk = 0

    def __init__(self, detector, pool_hw: Optional[Tuple[int, int]] = None):
        if pool_hw is not None and (len(pool_hw) != 2 or min(pool_hw) < 1):
            raise ValueError(f"grid pooling size must be two positive ints, got {pool_hw}")
        self.detector = detector
        self.pool_hw = None if pool_hw is None else (int(pool_hw[0]), int(pool_hw[1]))
        self.feature_dim = int(detector.grid_dim)

    def settings(self) -> List[str]:
        pool = "none" if self.pool_hw is None else f"{self.pool_hw[0]}x{self.pool_hw[1]}"
        return ["mode: grid", f"grid_pool: {pool}"]

    def records(self, prepared: Sequence[PreparedImage]) -> List[Record]:
        grids = self.detector.grid_batch(prepared)
        out = []
        for grid, p in zip(grids, prepared):
            if self.pool_hw is not None:
                grid = F.adaptive_avg_pool2d(grid[None], self.pool_hw)[0]
            out.append(grid_record(grid.cpu(), p.orig_hw, p.input_hw))
        return out


class RegionFeatureMaker:
    """Region features of the boxes a selection rule keeps, with their top-``attr_topk`` attributes.

    ``selection`` is ``"detectron2"`` or a :class:`BottomUpSettings`. ``attr_topk`` is capped at the
    model's number of attributes (0 for a model without an attribute head).
    """

    mode = "region"

    def __init__(self, detector, selection="detectron2", attr_topk: int = 10):
        if selection != "detectron2" and not isinstance(selection, BottomUpSettings):
            raise ValueError(
                f"region selection must be 'detectron2' or BottomUpSettings, got {selection!r}"
            )
        if attr_topk < 0:
            raise ValueError(
                f"the number of attributes per box cannot be negative, got {attr_topk}"
            )
        self.detector = detector
        self.selection = selection
        self.attr_topk = min(int(attr_topk), int(detector.num_attributes))
        self.feature_dim = int(detector.region_dim)

    def settings(self) -> List[str]:
        rule = "detectron2" if self.selection == "detectron2" else self.selection.describe()
        return ["mode: region", f"regions: {rule}", f"attr_topk: {self.attr_topk}"]

    def _regions(self, prepared: Sequence[PreparedImage]) -> List[Instances]:
        if self.selection == "detectron2":
            return detectron2_regions(self.detector, prepared)
        return bottom_up_regions(self.detector, prepared, self.selection)

    def records(self, prepared: Sequence[PreparedImage]) -> List[Record]:
        out = []
        for regions, p in zip(self._regions(prepared), prepared):
            attr_probs = regions.attr_probs if regions.has("attr_probs") else None
            attr_ids, attr_scores = top_attributes(attr_probs, self.attr_topk, len(regions))
            out.append(
                region_record(
                    regions.box_features.cpu(),
                    regions.pred_boxes.cpu(),
                    regions.scores.cpu(),
                    regions.pred_classes.cpu().to(torch.int32),
                    attr_ids.cpu(),
                    attr_scores.cpu(),
                    p.orig_hw,
                    p.input_hw,
                )
            )
        return out


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute for an image (hashable: equal specs can share a maker and a batch).

    ``regions`` is ``"detectron2"`` or a :class:`BottomUpSettings`; ``grid_pool`` and ``regions`` /
    ``attr_topk`` apply to grid and region mode respectively.
    """

    mode: str  # "grid" or "region"
    grid_pool: Optional[Tuple[int, int]] = None
    regions: Union[str, BottomUpSettings] = "detectron2"
    attr_topk: int = 0


def make_feature_maker(detector, spec: FeatureSpec) -> Union[GridFeatureMaker, RegionFeatureMaker]:
    """The maker that computes ``spec`` with ``detector``."""
    if spec.mode == "grid":
        return GridFeatureMaker(detector, spec.grid_pool)
    if spec.mode == "region":
        return RegionFeatureMaker(detector, spec.regions, spec.attr_topk)
    raise ValueError(f"unknown feature mode {spec.mode!r} (grid or region)")
