from gridfeats.modeling.backbone.resnet import (
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
    build_resnet_backbone,
    make_stage,
)

__all__ = [
    "BottleneckBlock",
    "DeformBottleneckBlock",
    "ResNet",
    "build_resnet_backbone",
    "make_stage",
]
