"""The ``Backbone`` interface: what the detector and grid extraction need from a feature network.

A backbone maps a normalised image batch to named feature maps and describes them
(:meth:`output_shape`), so the RPN and ROI heads are wired from metadata and never from a concrete
class. Grid extraction reads :meth:`grid_features`, which is the backbone's own rule: the
grid-feats-vqa ResNets run res5 undilated (stride 32) there while detection runs it dilated; a ViT
returns its patch tokens. :attr:`size_divisibility` tells the batcher how to pad (0: any size).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Dict

import torch
from torch import nn

from gridfeats.layers import ShapeSpec


class Backbone(nn.Module, metaclass=ABCMeta):
    """Abstract base of every backbone in :data:`~gridfeats.modeling.backbone.BACKBONE_REGISTRY`."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x``: normalised ``[N, C, H, W]`` batch -> ``{name: [N, C_i, H_i, W_i]}``."""

    @abstractmethod
    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every output of :meth:`forward`."""

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to a multiple of this before :meth:`forward` (0 or 1: no rule)."""
        return 0

    def grid_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The feature maps grid extraction reads (by default those of :meth:`forward`)."""
        return self.forward(x)
