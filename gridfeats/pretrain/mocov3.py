"""MoCo v3 (Chen, Xie & He, arXiv:2104.02057) as facebookresearch/moco-v3 trains it.

``base_encoder`` and ``momentum_encoder`` are a torchvision ResNet with a 2-layer projector as
``fc`` or a ViT with a 3-layer projector as ``head``; ``predictor`` is 2 layers (with the last BN
for ViT). Per step, in the repo's order: q1, q2 = predictor(base(x1, x2)); momentum update of the
momentum encoder's parameters with m; k1, k2 from the momentum encoder; loss ctr(q1, k2) + ctr(q2,
k1), each a cross-entropy over the global batch's keys scaled by 2T; optimizer step (LARS for
ResNets, AdamW for ViTs). lr: linear warm-up then half-cosine, per iteration; m: 1 - (1 - m0)(1 +
cos(pi e/E))/2 per iteration (``--moco-m-cos``). ``stop_grad_conv1`` freezes the ViT patch
projection.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.pretrain.base import (
    PretrainError,
    PretrainMethod,
    add_module,
    concat_all_gather,
    load_strict,
    optimizer_kind,
    read_obj,
    strip_module,
    world,
)
from gridfeats.pretrain.lars import LARS
from gridfeats.pretrain.nets import (
    backbone_features,
    is_vit,
    mlp_mocov3,
    resnet,
    resnet_arch_from_state,
    resnet_feature_dim,
)
from gridfeats.pretrain.vit import VisionTransformer, vit_from_arch, vit_from_state


class MoCoV3Net(nn.Module):
    """``base_encoder``, ``momentum_encoder``, ``predictor``: the repo's module tree."""

    def __init__(self, make_encoder, vit: bool, dim: int = 256, mlp_dim: int = 4096):
        super().__init__()
        self.base_encoder = make_encoder()
        self.momentum_encoder = make_encoder()
        if vit:
            hidden = self.base_encoder.embed_dim
            self.base_encoder.head = mlp_mocov3(3, hidden, mlp_dim, dim)
            self.momentum_encoder.head = mlp_mocov3(3, hidden, mlp_dim, dim)
            self.predictor = mlp_mocov3(2, dim, mlp_dim, dim)
        else:
            hidden = resnet_feature_dim(self.base_encoder)
            self.base_encoder.fc = mlp_mocov3(2, hidden, mlp_dim, dim)
            self.momentum_encoder.fc = mlp_mocov3(2, hidden, mlp_dim, dim)
            self.predictor = mlp_mocov3(2, dim, mlp_dim, dim, last_bn=False)
        for pb, pm in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            pm.data.copy_(pb.data)
            pm.requires_grad = False


class MoCoV3(PretrainMethod):
    name = "mocov3"
    hparams = ("lr", "weight_decay", "momentum", "ema", "temperature", "optimizer", "num_heads")

    def __init__(
        self,
        arch: str = "resnet50",
        checkpoint: Optional[Any] = None,
        lr: Optional[float] = None,
        weight_decay: Optional[float] = None,
        momentum: float = 0.9,
        ema: float = 0.99,
        temperature: Optional[float] = None,
        optimizer: Optional[str] = None,
        num_heads: Optional[int] = None,
        dim: int = 256,
        mlp_dim: int = 4096,
        stop_grad_conv1: Optional[bool] = None,
        ema_cos: bool = True,
        warmup_epochs: Optional[float] = None,
        img_size: int = 224,
        patch_size: int = 16,
        precision: str = "fp32",
        device: str = "cpu",
    ):
        super().__init__(arch, precision, device)
        obj = read_obj(checkpoint)
        state = strip_module(obj["state_dict"]) if obj is not None else None
        vit = is_vit(arch) if state is None else "base_encoder.cls_token" in state
        if state is not None:
            if vit:
                dim = state["predictor.3.weight"].shape[0]
                mlp_dim = state["predictor.0.weight"].shape[0]
            else:
                self.arch = arch = resnet_arch_from_state(state, "base_encoder.")
                dim, mlp_dim = state["predictor.3.weight"].shape
            if isinstance(obj.get("arch"), str):
                self.arch = obj["arch"]
        self.vit = vit
        # The recipes of CONFIG.md: R-50 LARS lr 0.6 (bs 4096 -> 0.6 * bs / 256 per 256) wd 1e-6
        # T 1.0 warm-up 10; ViT AdamW lr 1.5e-4 wd 0.1 T 0.2 warm-up 40, frozen patch projection.
        self.opt_name = optimizer or optimizer_kind(obj) or ("adamw" if vit else "lars")
        if self.opt_name not in ("lars", "adamw"):
            raise PretrainError(f"mocov3 optimizer must be lars or adamw, got {self.opt_name!r}")
        self.init_lr = self.lr = lr if lr is not None else (1.5e-4 if vit else 0.6)
        self.weight_decay = weight_decay if weight_decay is not None else (0.1 if vit else 1e-6)
        self.temperature = temperature if temperature is not None else (0.2 if vit else 1.0)
        self.momentum = momentum
        self.ema0 = self.ema = ema
        self.ema_cos = ema_cos
        self.warmup_epochs = warmup_epochs if warmup_epochs is not None else (40 if vit else 10)
        stop_grad_conv1 = vit if stop_grad_conv1 is None else stop_grad_conv1

        def make_encoder() -> nn.Module:
            if not vit:
                return resnet(arch, num_classes=mlp_dim, zero_init_residual=True)
            kw = dict(pos_embed="sincos-row", stop_grad_conv1=stop_grad_conv1)
            if state is not None:
                return vit_from_state(
                    state, "base_encoder.", num_heads=num_heads, default_heads=12, **kw
                )
            return vit_from_arch(
                arch, img_size, patch_size, num_heads=num_heads or 12, **kw
            )  # MoCo v3's ViTs have 12 heads at every size (moco-v3 vits.py)

        self.model = MoCoV3Net(make_encoder, vit, dim, mlp_dim)
        self._finish(obj)

    def build_optimizer(self) -> torch.optim.Optimizer:
        if self.opt_name == "lars":
            return LARS(
                self.model.parameters(),
                self.lr,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
            )
        return torch.optim.AdamW(self.model.parameters(), self.lr, weight_decay=self.weight_decay)

    def apply_hparams(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = self.lr, self.weight_decay
            if self.opt_name == "lars":
                group["momentum"] = self.momentum

    def set_progress(self, epoch: float, epochs: int, iters_per_epoch: int = 0) -> None:
        """Per-iteration warm-up + half-cosine lr and cosine momentum (main_moco.py)."""
        super().set_progress(epoch, epochs)
        if epoch < self.warmup_epochs:
            self.lr = self.init_lr * epoch / self.warmup_epochs
        else:
            span = epochs - self.warmup_epochs
            self.lr = (
                self.init_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))
            )
        if self.ema_cos:
            self.ema = 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - self.ema0)
        self.apply_hparams()

    @torch.no_grad()
    def _momentum_update(self, m: float) -> None:
        enc_b, enc_m = self.model.base_encoder, self.model.momentum_encoder
        for pb, pm in zip(enc_b.parameters(), enc_m.parameters()):
            pm.data = pm.data * m + pb.data * (1.0 - m)

    def _contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        k = concat_all_gather(k)
        logits = torch.einsum("nc,mc->nm", q, k) / self.temperature
        n = logits.shape[0]
        labels = torch.arange(n, dtype=torch.long, device=q.device) + n * world()[0]
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def _step(self, views: List[torch.Tensor], **kwargs) -> torch.Tensor:
        x1, x2 = views
        with self.autocast():
            q1 = self.model.predictor(self.model.base_encoder(x1))
            q2 = self.model.predictor(self.model.base_encoder(x2))
            with torch.no_grad():
                self._momentum_update(self.ema)
                k1 = self.model.momentum_encoder(x1)
                k2 = self.model.momentum_encoder(x2)
            loss = self._contrastive(q1, k2) + self._contrastive(q2, k1)
        self.backward_and_step(loss)
        return loss.detach()

    def upstream_state_dict(self) -> Dict[str, Any]:
        out = {
            "epoch": self.epoch,
            "arch": self.arch,
            "state_dict": add_module(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_upstream(self, obj: Mapping[str, Any]) -> None:
        load_strict(self.model, strip_module(obj["state_dict"]), "mocov3 state_dict")
        self.load_optimizer_state(obj.get("optimizer"))
        if self.scaler is not None and obj.get("scaler"):
            self.scaler.load_state_dict(obj["scaler"])

    def backbone(self) -> nn.Module:
        return self.model.base_encoder

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.model.base_encoder, x)

    def monitor_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.base_encoder(x)


__all__ = ["MoCoV3", "MoCoV3Net", "VisionTransformer"]
