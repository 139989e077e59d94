"""Backbones: the interface, the registry and the registered implementations."""

from gridfeats.modeling.backbone.backbone import Backbone
from gridfeats.modeling.backbone.build import BACKBONE_REGISTRY, build_backbone
from gridfeats.modeling.backbone.hf import HFVisionBackbone, build_hf_backbone  # registers it
from gridfeats.modeling.backbone.resnet import (  # registers build_resnet_backbone
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
    build_resnet_backbone,
    make_stage,
)
from gridfeats.modeling.backbone.vit import VisionTransformer, build_vit_backbone  # registers it

__all__ = [
    "BACKBONE_REGISTRY",
    "Backbone",
    "BottleneckBlock",
    "DeformBottleneckBlock",
    "HFVisionBackbone",
    "ResNet",
    "VisionTransformer",
    "build_backbone",
    "build_hf_backbone",
    "build_resnet_backbone",
    "build_vit_backbone",
    "make_stage",
]
