"""Learning-rate warm-up and step decay, in the two forms the VQA papers use.

* MCAN (MILVLG/mcan-vqa): "staircase" warm-up by epoch, ``lr * k/(n+1)`` during warm-up epoch
  ``k = 1..n`` (n = 3 gives 1/4, 2/4, 3/4), then ``x0.2`` at epochs 10 and 12, 13 epochs.
* Pythia v0.1 (mmf): linear warm-up by iteration from ``warmup_factor`` (0.2) to 1 over 1000
  updates, then ``x0.1`` at each of the update milestones (5k, 7k, 9k, 11k of 12k).

Both are a multiplier of the base LR as a function of the global optimizer step, so one
``LambdaLR`` covers them and its state (just the step count) checkpoints and resumes exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, List, Mapping

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

UNITS = ("epoch", "step")
WARMUP_METHODS = ("staircase", "linear", "none")


@dataclass(frozen=True)
class WarmupStepDecay:
    """LR multiplier for optimizer step ``step`` (0-based: the step about to be taken).

    ``unit`` says whether ``warmup`` and ``milestones`` count epochs or optimizer steps.
    """

    steps_per_epoch: int
    unit: str = "epoch"
    warmup: float = 0.0
    warmup_method: str = "staircase"
    warmup_factor: float = 0.2
    milestones: List[float] = field(default_factory=list)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"schedule.unit must be one of {UNITS}, got {self.unit!r}")
        if self.warmup_method not in WARMUP_METHODS:
            raise ValueError(
                f"schedule.warmup_method must be one of {WARMUP_METHODS}, "
                f"got {self.warmup_method!r}"
            )
        if self.steps_per_epoch <= 0:
            raise ValueError("steps_per_epoch must be positive (is the training set empty?)")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"schedule.milestones must be increasing, got {self.milestones}")

    def _position(self, step: int) -> float:
        """Where ``step`` lies in the schedule's unit: completed epochs, or steps."""
        if self.unit == "epoch":
            return float(step // self.steps_per_epoch)
        return float(step)

    def __call__(self, step: int) -> float:
        position = self._position(step)
        decay = self.gamma ** bisect.bisect_right(list(self.milestones), position)
        if self.warmup_method == "none" or position >= self.warmup:
            return decay
        if self.warmup_method == "staircase":
            return decay * (int(position) + 1) / (int(self.warmup) + 1)
        alpha = position / self.warmup
        return decay * (self.warmup_factor * (1.0 - alpha) + alpha)


def build_scheduler(
    optimizer: Optimizer, schedule_cfg: Mapping[str, Any], steps_per_epoch: int
) -> LambdaLR:
    """``schedule_cfg`` is the config's ``schedule:`` section (see ``WarmupStepDecay``)."""
    multiplier = WarmupStepDecay(steps_per_epoch=steps_per_epoch, **dict(schedule_cfg))
    return LambdaLR(optimizer, multiplier)
