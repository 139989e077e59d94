"""Optimizer construction from the config's ``optim:`` section.

Only the optimizers the heads' papers use: Adam (MCAN, beta2 0.98, eps 1e-9), Adamax (Pythia),
AdamW and SGD for experiments. Parameter groups come from ``gridfeats.engine.build_param_groups``
(``optim.weight_decay_norm`` / ``optim.weight_decay_bias``: null = same as ``weight_decay``, which
gives one group, as the papers train). Gradient clipping (Pythia clips the global norm at 0.25)
is done by the engine from ``optim.grad_clip`` and ``optim.grad_clip_type``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.optim import Optimizer

from gridfeats.engine import build_param_groups

OPTIMIZERS = ("adam", "adamw", "adamax", "sgd")


def _optional_float(value: Any) -> Any:
    return None if value is None else float(value)


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any]) -> Optimizer:
    name = optim_cfg["name"]
    lr = float(optim_cfg["lr"])
    weight_decay = float(optim_cfg["weight_decay"])
    groups = build_param_groups(
        model,
        weight_decay=weight_decay,
        weight_decay_norm=_optional_float(optim_cfg.get("weight_decay_norm")),
        weight_decay_bias=_optional_float(optim_cfg.get("weight_decay_bias")),
    )
    if name in ("adam", "adamw", "adamax"):
        betas = tuple(float(b) for b in optim_cfg["betas"])
        if len(betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {optim_cfg['betas']}")
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}[
            name
        ]
        return cls(
            groups, lr=lr, betas=betas, eps=float(optim_cfg["eps"]), weight_decay=weight_decay
        )
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=float(optim_cfg["momentum"]), weight_decay=weight_decay
        )
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
