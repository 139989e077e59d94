"""``build_model``: the detector named by a config, optionally initialised from a checkpoint."""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

from gridfeats.modeling.meta_arch import GeneralizedRCNN

logger = logging.getLogger(__name__)


def build_model(
    cfg,
    weights: Optional[Union[str, "os.PathLike[str]"]] = None,
    allow_partial: bool = True,
) -> GeneralizedRCNN:
    """The ``MODEL.META_ARCHITECTURE`` model of ``cfg`` with every part built from it, in train
    mode (as ``nn.Module`` starts), ``MODEL.BACKBONE.FREEZE_AT`` applied and FrozenBN norms.

    ``weights``: a checkpoint to initialise from (a Detectron2 ``.pth`` / ``{"model": ...}``, a
    Caffe2 ImageNet ``.pkl`` matched by name suffix, ...). ``allow_partial`` accepts one that leaves
    some tensors at their initialisation, as an ImageNet backbone does for the heads (Detectron2
    only warns); the load report is logged either way. Loading never changes which parameters
    are frozen.
    """
    model = GeneralizedRCNN.from_config(cfg)
    if weights is not None:
        from gridfeats.checkpoint import load_checkpoint

        report, _ = load_checkpoint(model, weights, allow_partial=allow_partial)
        if not report.complete:
            logger.warning("%s initialises only part of the model:\n%s", weights, report.summary())
    return model.train()
