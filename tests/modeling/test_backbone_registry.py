"""Adding a backbone is one class plus a registry entry: a toy one runs grids and detection."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.api import Detector
from gridfeats.config import get_cfg
from gridfeats.layers import ShapeSpec
from gridfeats.modeling.backbone import BACKBONE_REGISTRY, Backbone, build_backbone


class ToyBackbone(Backbone):
    """Two strided convs (stride 16), padded to multiples of 32; its grid rule pools 2x2 cells."""

    def __init__(self, in_channels: int, channels: int = 12):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 4, stride=4)
        self.conv2 = nn.Conv2d(channels, channels, 4, stride=4)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"toy": F.relu(self.conv2(F.relu(self.conv1(x))))}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"toy": ShapeSpec(self.channels, 16)}

    @property
    def size_divisibility(self) -> int:
        return 32

    def grid_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"toy": F.avg_pool2d(self.forward(x)["toy"], 2)}


@pytest.fixture()
def toy_registered():
    name = "build_toy_backbone_for_tests"

    def build(cfg, input_shape: ShapeSpec) -> ToyBackbone:
        return ToyBackbone(input_shape.channels)

    build.__name__ = name
    BACKBONE_REGISTRY.register(build)  # what a new backbone file does with the decorator
    yield name
    del BACKBONE_REGISTRY._obj_map[name]


def _cfg(name: str):
    return get_cfg(
        "R-50-grid",
        opts=[
            "MODEL.BACKBONE.NAME", name,
            "MODEL.RPN.IN_FEATURES", "['toy']",
            "MODEL.ROI_HEADS.IN_FEATURES", "['toy']",
            "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "96",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            "MODEL.ROI_HEADS.NUM_CLASSES", "7",
            "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES", "5",
        ],
    )  # fmt: skip


def test_a_registered_toy_backbone_runs_extract_grid_and_detect(toy_registered):
    detector = Detector(_cfg(toy_registered), seed=0)
    assert isinstance(detector.model.backbone, ToyBackbone)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    grid = detector.extract_grid(image)  # 64x90 input, padded to 64x96 -> 4x6 map -> 2x3 grid
    assert grid.shape == (12, 2, 3)
    p = detector.prepare(image)
    with torch.no_grad():
        padded = detector.model.normalize([p.image]).tensor
        assert padded.shape[-2:] == (64, 96)
        expected = detector.model.backbone.grid_features(padded)["toy"][0]
    torch.testing.assert_close(grid, expected)
    out = detector.detect(image)
    assert len(out["boxes"]) > 0
    assert out["features"].shape == (len(out["boxes"]), detector.region_dim)
    assert out["attr_scores"].shape == (len(out["boxes"]), 5)
    assert (out["boxes"][:, 2] <= 70).all() and (out["boxes"][:, 3] <= 50).all()


def test_an_unknown_backbone_name_is_refused_with_the_known_ones():
    cfg = get_cfg("R-50-grid", opts=["MODEL.BACKBONE.NAME", "build_nothing"])
    with pytest.raises(ValueError, match="build_resnet_backbone"):
        build_backbone(cfg)
