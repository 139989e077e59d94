"""Building blocks shared by the models: frozen norm, conv with norm child, detection ops."""

from gridfeats.layers.box_nms import batched_nms, nms
from gridfeats.layers.conv import Conv2d
from gridfeats.layers.frozen_bn import FrozenBatchNorm2d
from gridfeats.layers.shape_spec import ShapeSpec

__all__ = ["Conv2d", "FrozenBatchNorm2d", "ShapeSpec", "batched_nms", "nms"]
