"""LARS as MoCo v3 uses it for ResNets (You et al., arXiv:1708.03888).

For parameters with more than one dimension the update is (grad + wd * p), rescaled by the trust
ratio eta * ||p|| / ||update|| (1 where either norm is 0); normalisation parameters and biases
(<= 1-D) get neither weight decay nor rescaling. Heavy-ball momentum without dampening, kept in the
state under ``mu`` (the name in MoCo v3's checkpoints).
"""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(p_norm)
                    ratio = group["trust_coefficient"] * p_norm / u_norm
                    trust = torch.where(p_norm > 0.0, torch.where(u_norm > 0, ratio, one), one)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
