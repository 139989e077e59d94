"""``build_model``: the detector named by a config."""

from __future__ import annotations

from gridfeats.modeling.meta_arch import GeneralizedRCNN


def build_model(cfg) -> GeneralizedRCNN:
    """The ``MODEL.META_ARCHITECTURE`` model of ``cfg`` with every part built from it."""
    return GeneralizedRCNN.from_config(cfg)
