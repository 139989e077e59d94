"""The backbone registry: ``MODEL.BACKBONE.NAME`` names the builder, as in Detectron2.

A builder is ``fn(cfg, input_shape: ShapeSpec) -> Backbone``. Adding a backbone is one new file in
this package with ``@BACKBONE_REGISTRY.register()`` on its builder, imported in ``__init__.py``.
"""

from __future__ import annotations

from typing import Optional

from fvcore.common.registry import Registry

from gridfeats.layers import ShapeSpec
from gridfeats.modeling.backbone.backbone import Backbone

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Backbone builders: fn(cfg, input_shape: ShapeSpec) -> Backbone."


def build_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> Backbone:
    """The backbone ``cfg.MODEL.BACKBONE.NAME`` names, for ``len(MODEL.PIXEL_MEAN)`` input
    channels."""
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN), stride=1)
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONE_REGISTRY:
        known = ", ".join(sorted(k for k, _ in BACKBONE_REGISTRY))
        raise ValueError(f"MODEL.BACKBONE.NAME {name!r} is not a registered backbone ({known})")
    backbone = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    if not isinstance(backbone, Backbone):
        raise TypeError(
            f"backbone builder {name!r} returned {type(backbone).__name__}, not a Backbone"
        )
    return backbone
