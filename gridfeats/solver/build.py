"""Optimizer and LR scheduler from the config, as Detectron2@ffff8ac builds them.

One SGD parameter group per trainable tensor (``model.modules()`` order, each shared tensor once),
so that per-tensor LR / weight-decay rules stay visible to checkpoints and schedulers:

* parameters of normalisation layers: ``WEIGHT_DECAY_NORM`` (FrozenBN has no parameters at all);
* other tensors named ``bias``: ``BASE_LR * BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS``;
* everything else (the attribute class embedding included): ``BASE_LR`` and ``WEIGHT_DECAY``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Set, Type, Union

import torch
from torch import nn

from gridfeats.solver.lr_scheduler import WarmupCosineLR, WarmupMultiStepLR

NORM_MODULE_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

_Params = Union[torch.Tensor, Iterable[torch.Tensor]]


def get_default_optimizer_params(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    """The parameter groups described in the module docstring."""
    s = cfg.SOLVER
    params: List[Dict[str, Any]] = []
    memo: Set[nn.Parameter] = set()
    for module in model.modules():
        for key, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            lr, weight_decay = s.BASE_LR, s.WEIGHT_DECAY
            if isinstance(module, NORM_MODULE_TYPES):
                weight_decay = s.WEIGHT_DECAY_NORM
            elif key == "bias":
                lr = s.BASE_LR * s.BIAS_LR_FACTOR
                weight_decay = s.WEIGHT_DECAY_BIAS
            params.append({"params": [value], "lr": lr, "weight_decay": weight_decay})
    return params


def _gradient_clipper(clip_cfg) -> Callable[[_Params], None]:
    kind = clip_cfg.CLIP_TYPE
    if kind == "value":
        return lambda p: nn.utils.clip_grad_value_(p, clip_cfg.CLIP_VALUE)
    if kind == "norm":
        return lambda p: nn.utils.clip_grad_norm_(p, clip_cfg.CLIP_VALUE, clip_cfg.NORM_TYPE)
    raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {kind!r} is not 'value' or 'norm'")


def _with_gradient_clipping(
    optimizer_type: Type[torch.optim.Optimizer], clipper: Callable[[_Params], None]
) -> Type[torch.optim.Optimizer]:
    """A subclass whose ``step`` clips every parameter's gradient on its own first (Detectron2
    clips per tensor, so a ``norm`` limit applies to each tensor, not to the global norm)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                clipper(p)
        return super(clipped, self).step(closure)

    clipped = type(optimizer_type.__name__ + "WithGradientClip", (optimizer_type,), {"step": step})
    return clipped


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (momentum ``SOLVER.MOMENTUM``, no Nesterov, no dampening) over the
    per-tensor groups; gradient clipping wrapped in when ``SOLVER.CLIP_GRADIENTS.ENABLED``."""
    params = get_default_optimizer_params(cfg, model)
    if not params:
        raise ValueError("the model has no trainable parameters (check MODEL.BACKBONE.FREEZE_AT)")
    optimizer = torch.optim.SGD(params, cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)
    if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
        clipper = _gradient_clipper(cfg.SOLVER.CLIP_GRADIENTS)
        optimizer.__class__ = _with_gradient_clipping(type(optimizer), clipper)
    return optimizer


def build_lr_scheduler(
    cfg, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """``SOLVER.LR_SCHEDULER_NAME``: ``WarmupMultiStepLR`` (``STEPS``, ``GAMMA``) or
    ``WarmupCosineLR`` (``MAX_ITER``), both with ``WARMUP_FACTOR/ITERS/METHOD``."""
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    if name == "WarmupMultiStepLR":
        return WarmupMultiStepLR(
            optimizer,
            s.STEPS,
            s.GAMMA,
            warmup_factor=s.WARMUP_FACTOR,
            warmup_iters=s.WARMUP_ITERS,
            warmup_method=s.WARMUP_METHOD,
        )
    if name == "WarmupCosineLR":
        return WarmupCosineLR(
            optimizer,
            s.MAX_ITER,
            warmup_factor=s.WARMUP_FACTOR,
            warmup_iters=s.WARMUP_ITERS,
            warmup_method=s.WARMUP_METHOD,
        )
    raise ValueError(
        f"SOLVER.LR_SCHEDULER_NAME {name!r} is not supported (WarmupMultiStepLR, WarmupCosineLR)"
    )
