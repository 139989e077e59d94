"""Optimizer and LR schedules for detector training (Detectron2@ffff8ac semantics)."""

from gridfeats.solver.build import build_lr_scheduler, build_optimizer, get_default_optimizer_params
from gridfeats.solver.lr_scheduler import WarmupCosineLR, WarmupMultiStepLR

__all__ = [
    "WarmupCosineLR",
    "WarmupMultiStepLR",
    "build_lr_scheduler",
    "build_optimizer",
    "get_default_optimizer_params",
]
