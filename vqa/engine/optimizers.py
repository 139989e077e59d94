"""Optimizer construction from the config's ``optim:`` section.

Only the optimizers the heads' papers use: Adam (MCAN, beta2 0.98, eps 1e-9), Adamax (Pythia),
AdamW and SGD for experiments. Gradient clipping (Pythia clips the global norm at 0.25) is done
by the trainer from ``optim.grad_clip``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch.optim import Optimizer

OPTIMIZERS = ("adam", "adamw", "adamax", "sgd")


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], optim_cfg: Mapping[str, Any]
) -> Optimizer:
    name = optim_cfg["name"]
    params = [p for p in parameters if p.requires_grad]
    lr = float(optim_cfg["lr"])
    weight_decay = float(optim_cfg["weight_decay"])
    if name in ("adam", "adamw", "adamax"):
        betas = tuple(float(b) for b in optim_cfg["betas"])
        if len(betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {optim_cfg['betas']}")
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}[
            name
        ]
        return cls(
            params, lr=lr, betas=betas, eps=float(optim_cfg["eps"]), weight_decay=weight_decay
        )
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=float(optim_cfg["momentum"]), weight_decay=weight_decay
        )
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
