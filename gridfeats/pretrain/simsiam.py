"""SimSiam (Chen & He, arXiv:2011.10566) as facebookresearch/simsiam trains it.

Loss -1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))]; the encoder is torchvision's ResNet with its fc
replaced by the 3-layer BN projector (``encoder.fc.{0..7}``), the predictor a 2-layer bottleneck
(``predictor.{0,1,3}``). SGD (momentum 0.9, wd 1e-4) with a per-epoch cosine lr; with
``predictor_fixed_lr`` (the README recipe's ``--fix-pred-lr``) the predictor is a second parameter
group kept at the initial lr. ``stop_grad=False`` and ``predictor=False`` are the paper's ablations
(Fig. 2 and Table 1): without stop-gradient the outputs collapse.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.pretrain.base import EncoderCheckpointMethod, read_obj, strip_module
from gridfeats.pretrain.nets import (
    resnet,
    resnet_arch_from_state,
    resnet_feature_dim,
    simsiam_predictor,
    simsiam_projector,
)


class SimSiamNet(nn.Module):
    """``encoder`` (ResNet + projector as ``fc``) and ``predictor``: the repo's module tree."""

    def __init__(self, arch: str, dim: int = 2048, pred_dim: int = 512):
        super().__init__()
        self.encoder = resnet(arch, num_classes=dim, zero_init_residual=True)
        self.encoder.fc = simsiam_projector(resnet_feature_dim(self.encoder), dim)
        self.predictor = simsiam_predictor(dim, pred_dim)


class SimSiam(EncoderCheckpointMethod):
    name = "simsiam"
    encoder_name = "encoder"
    hparams = ("lr", "weight_decay", "momentum", "predictor_fixed_lr")

    def __init__(
        self,
        arch: str = "resnet50",
        checkpoint: Optional[Any] = None,
        lr: float = 0.05,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        predictor_fixed_lr: Optional[bool] = None,
        dim: Optional[int] = None,
        pred_dim: Optional[int] = None,
        stop_grad: bool = True,
        predictor: bool = True,
        precision: str = "fp32",
        device: str = "cpu",
    ):
        super().__init__(arch, precision, device)
        obj = read_obj(checkpoint)
        if obj is not None:
            state = strip_module(obj["state_dict"])
            self.arch = arch = resnet_arch_from_state(state, "encoder.")
            dim = state["encoder.fc.6.weight"].shape[0]
            pred_dim = state["predictor.0.weight"].shape[0]
            groups = (obj.get("optimizer") or {}).get("param_groups")
            if predictor_fixed_lr is None and groups:  # --fix-pred-lr wrote 2 groups
                predictor_fixed_lr = len(groups) == 2
        if predictor_fixed_lr is None:
            predictor_fixed_lr = True  # the README recipe's --fix-pred-lr
        self.init_lr = self.lr = lr
        self.weight_decay, self.momentum = weight_decay, momentum
        self.predictor_fixed_lr = predictor_fixed_lr
        self.stop_grad, self.use_predictor = stop_grad, predictor
        self.model = SimSiamNet(arch, dim or 2048, pred_dim or 512)
        self._finish(obj)

    def build_optimizer(self) -> torch.optim.Optimizer:
        if self.predictor_fixed_lr:
            params = [
                {"params": self.model.encoder.parameters(), "fix_lr": False},
                {"params": self.model.predictor.parameters(), "fix_lr": True},
            ]
        else:
            params = self.model.parameters()
        return torch.optim.SGD(
            params, self.init_lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def apply_hparams(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.init_lr if group.get("fix_lr") else self.lr
            group["momentum"], group["weight_decay"] = self.momentum, self.weight_decay

    def set_progress(self, epoch: float, epochs: int, iters_per_epoch: int = 0) -> None:
        """Cosine per whole epoch, as ``adjust_learning_rate`` in main_simsiam.py."""
        super().set_progress(epoch, epochs)
        self.lr = self.init_lr * 0.5 * (1.0 + math.cos(math.pi * int(epoch) / epochs))
        self.apply_hparams()

    def _step(self, views: List[torch.Tensor], **kwargs) -> torch.Tensor:
        x1, x2 = views
        with self.autocast():
            z1, z2 = self.model.encoder(x1), self.model.encoder(x2)
            if self.use_predictor:
                p1, p2 = self.model.predictor(z1), self.model.predictor(z2)
            else:
                p1, p2 = z1, z2
            t1, t2 = (z1.detach(), z2.detach()) if self.stop_grad else (z1, z2)
            loss = (
                -(
                    F.cosine_similarity(p1, t2, dim=1).mean()
                    + F.cosine_similarity(p2, t1, dim=1).mean()
                )
                * 0.5
            )
        self.backward_and_step(loss)
        return loss.detach()
