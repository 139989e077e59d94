"""Backbones: the interface, the registry and the registered implementations."""

from gridfeats.modeling.backbone.backbone import Backbone
from gridfeats.modeling.backbone.build import BACKBONE_REGISTRY, build_backbone
from gridfeats.modeling.backbone.resnet import (  # registers build_resnet_backbone
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
    build_resnet_backbone,
    make_stage,
)

__all__ = [
    "BACKBONE_REGISTRY",
    "Backbone",
    "BottleneckBlock",
    "DeformBottleneckBlock",
    "ResNet",
    "build_backbone",
    "build_resnet_backbone",
    "make_stage",
]
