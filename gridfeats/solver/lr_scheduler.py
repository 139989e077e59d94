"""Detectron2's iteration-based LR schedules: linear/constant warm-up, then steps or a cosine.

``last_epoch`` counts *iterations* (the scheduler steps after every optimizer step). The
arithmetic order (``base_lr * warmup * gamma ** k``) is Detectron2's, so every LR is the same
double as the reference's; milestones use ``bisect_right``, so the drop happens *at* the milestone.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import List, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

WARMUP_METHODS = ("linear", "constant")


def warmup_factor_at_iter(method: str, it: int, warmup_iters: int, warmup_factor: float) -> float:
    """Multiplier at iteration ``it``: ``warmup_factor`` growing linearly to 1 at ``warmup_iters``
    (``linear``) or held at ``warmup_factor`` until then (``constant``); 1 afterwards."""
    if it >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    if method == "linear":
        alpha = it / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    raise ValueError(f"unknown SOLVER.WARMUP_METHOD {method!r} (one of {WARMUP_METHODS})")


class WarmupMultiStepLR(LRScheduler):
    """``base_lr * warmup(t) * gamma ** #{milestones <= t}``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ):
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones):
            raise ValueError(f"SOLVER.STEPS must be increasing iterations, got {milestones}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(f"unknown SOLVER.WARMUP_METHOD {warmup_method!r}")
        self.milestones = milestones
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        warmup = warmup_factor_at_iter(
            self.warmup_method, self.last_epoch, self.warmup_iters, self.warmup_factor
        )
        k = bisect_right(self.milestones, self.last_epoch)
        return [base_lr * warmup * self.gamma**k for base_lr in self.base_lrs]


class WarmupCosineLR(LRScheduler):
    """``base_lr * warmup(t) * 0.5 * (1 + cos(pi * t / max_iters))``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ):
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(f"unknown SOLVER.WARMUP_METHOD {warmup_method!r}")
        self.max_iters = max_iters
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        warmup = warmup_factor_at_iter(
            self.warmup_method, self.last_epoch, self.warmup_iters, self.warmup_factor
        )
        cosine = 1.0 + math.cos(math.pi * self.last_epoch / self.max_iters)
        return [base_lr * warmup * 0.5 * cosine for base_lr in self.base_lrs]
