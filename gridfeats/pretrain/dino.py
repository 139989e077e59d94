"""DINO (Caron et al., arXiv:2104.14294) as facebookresearch/dino trains it.

Student and teacher are ``MultiCropWrapper``s of a backbone (ViT with a learned position table, or
a torchvision ResNet with ``fc`` removed) and a ``DINOHead``; consecutive crops of one resolution go
through the backbone together, the head runs once on all of them. The teacher sees the 2 global
crops, the student all of them. Loss: for every (teacher global view, other student view) pair,
-softmax((t - center) / tau_t) . log softmax(s / tau_s), averaged; then the center moves to
``center_momentum`` * center + (1 - ...) * batch mean of the teacher outputs. Per step, in the
repo's order: lr / weight decay from their schedules, teacher and student forwards, loss (and center
update), backward, per-parameter gradient clipping (``clip_grad``), no gradient for the head's last
layer during the first ``freeze_last_layer`` epochs, optimizer step, EMA of the teacher with the
cosine momentum schedule. The teacher temperature warms up linearly per epoch.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gridfeats.pretrain.base import (
    PretrainError,
    PretrainMethod,
    add_module,
    load_strict,
    optimizer_kind,
    read_obj,
    strip_module,
    world,
)
from gridfeats.pretrain.nets import (
    DINOHead,
    backbone_features,
    dino_head_from_state,
    is_vit,
    resnet,
    resnet_arch_from_state,
    resnet_feature_dim,
)
from gridfeats.pretrain.vit import vit_from_arch, vit_from_state

_DINO_HEADS = {192: 3, 384: 6, 768: 12}  # DINO's vit_tiny / vit_small / vit_base


class MultiCropWrapper(nn.Module):
    """``backbone`` + ``head``; one backbone pass per run of same-width crops, one head pass."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        if hasattr(backbone, "fc"):
            backbone.fc = nn.Identity()
        if hasattr(backbone, "head"):
            backbone.head = nn.Identity()
        self.backbone = backbone
        self.head = head

    def backbone_outputs(self, crops: List[torch.Tensor]) -> torch.Tensor:
        widths = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        start, outputs = 0, []
        for end in ends.tolist():
            outputs.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return torch.cat(outputs)

    def forward(self, crops: List[torch.Tensor]) -> torch.Tensor:
        return self.head(self.backbone_outputs(crops))


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def cosine_schedule(base: float, final: float, it: int, total: int, warmup: int = 0) -> float:
    """``utils.cosine_scheduler(...)[it]`` without building the array (linspace warm-up from 0)."""
    if it < warmup:
        return float(np.linspace(0, base, warmup)[it])
    n = total - warmup
    return float(final + 0.5 * (base - final) * (1 + np.cos(np.pi * (it - warmup) / n)))


class DINO(PretrainMethod):
    name = "dino"
    hparams = (
        "lr",
        "weight_decay",
        "momentum",
        "ema",
        "teacher_temp",
        "student_temp",
        "center_momentum",
        "optimizer",
        "num_heads",
    )

    def __init__(
        self,
        arch: str = "vit_small",
        checkpoint: Optional[Any] = None,
        lr: Optional[float] = None,
        weight_decay: Optional[float] = None,
        weight_decay_end: Optional[float] = None,
        momentum: float = 0.9,
        ema: float = 0.996,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: Optional[float] = None,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        optimizer: Optional[str] = None,
        num_heads: Optional[int] = None,
        out_dim: int = 65536,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        drop_path_rate: float = 0.1,
        min_lr: float = 1e-6,
        warmup_epochs: int = 10,
        patch_size: int = 16,
        img_size: int = 224,
        precision: str = "fp32",
        device: str = "cpu",
    ):
        super().__init__(arch, precision, device)
        obj = read_obj(checkpoint)
        student_state = strip_module(obj["student"]) if obj is not None else None
        vit = is_vit(arch) if obj is None else "backbone.cls_token" in student_state
        self.vit = vit
        self.opt_name = optimizer or optimizer_kind(obj) or ("adamw" if vit else "sgd")
        if self.opt_name not in ("adamw", "sgd"):
            raise PretrainError(f"dino optimizer must be adamw or sgd here, got {self.opt_name!r}")
        # main_dino.py defaults (ViT) / the README's ResNet-50 command (SGD lr 0.03, wd 1e-4).
        self.init_lr = self.lr = lr if lr is not None else (5e-4 if vit else 0.03)
        self.wd0 = self.weight_decay = (
            weight_decay if weight_decay is not None else (0.04 if vit else 1e-4)
        )
        self.wd_end = (
            weight_decay_end if weight_decay_end is not None else (0.4 if vit else self.wd0)
        )
        self.momentum = momentum
        self.ema0 = self.ema = ema
        self.final_teacher_temp = self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = (
            teacher_temp if warmup_teacher_temp is None else warmup_teacher_temp
        )
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.min_lr, self.warmup_epochs = min_lr, warmup_epochs

        def make(student: bool) -> nn.Module:
            dpr = drop_path_rate if student else 0.0
            if vit:
                if student_state is not None:
                    dim = student_state["backbone.patch_embed.proj.weight"].shape[0]
                    heads = num_heads or _DINO_HEADS.get(dim, dim // 64)
                    return vit_from_state(
                        student_state,
                        "backbone.",
                        num_heads=heads,
                        pos_embed="learned",
                        drop_path_rate=dpr,
                    )
                return vit_from_arch(
                    arch,
                    img_size,
                    patch_size,
                    num_heads=num_heads,
                    pos_embed="learned",
                    drop_path_rate=dpr,
                )
            name = (
                arch
                if student_state is None
                else resnet_arch_from_state(student_state, "backbone.")
            )
            self.arch = name
            return resnet(name)

        def head(backbone: nn.Module, student: bool) -> nn.Module:
            if student_state is not None:
                return dino_head_from_state(
                    student_state, "head.", norm_last_layer if student else True
                )
            in_dim = backbone.embed_dim if vit else resnet_feature_dim(backbone)
            return DINOHead(
                in_dim,
                out_dim,
                use_bn=use_bn_in_head,
                norm_last_layer=norm_last_layer if student else True,
            )

        s_backbone, t_backbone = make(True), make(False)
        self.student = MultiCropWrapper(s_backbone, head(s_backbone, True))
        self.teacher = MultiCropWrapper(t_backbone, head(t_backbone, False))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        out = self.student.head.last_layer.weight_v.shape[0]
        self.register_buffer("center", torch.zeros(1, out))
        self._finish(obj)

    # ----------------------------------------------------------------------------- optimisation
    def build_optimizer(self) -> torch.optim.Optimizer:
        """``utils.get_params_groups``: [regularised, not regularised (biases, 1-D; wd 0)]."""
        reg, not_reg = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (not_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
        groups = [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]
        if self.opt_name == "sgd":
            return torch.optim.SGD(groups, lr=0, momentum=self.momentum)
        return torch.optim.AdamW(groups)

    def apply_hparams(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr
            if i == 0:
                group["weight_decay"] = self.weight_decay
            if self.opt_name == "sgd":
                group["momentum"] = self.momentum

    def set_progress(self, epoch: float, epochs: int, iters_per_epoch: int = 1000) -> None:
        """The repo's per-iteration lr, weight-decay and momentum schedules."""
        super().set_progress(epoch, epochs)
        n = max(1, int(iters_per_epoch))
        it, total = int(round(epoch * n)), epochs * n
        self.lr = cosine_schedule(self.init_lr, self.min_lr, it, total, self.warmup_epochs * n)
        self.weight_decay = cosine_schedule(self.wd0, self.wd_end, it, total)
        self.ema = cosine_schedule(self.ema0, 1.0, it, total)
        self.apply_hparams()

    def teacher_temp_at(self, epoch: int) -> float:
        """``DINOLoss.teacher_temp_schedule[epoch]``: linspace warm-up over the first epochs."""
        w = self.warmup_teacher_temp_epochs
        if epoch < w:
            return float(np.linspace(self.warmup_teacher_temp, self.final_teacher_temp, w)[epoch])
        return float(self.final_teacher_temp)

    def num_views(self) -> int:
        return 2  # globals; the augmentation adds the local crops

    # ---------------------------------------------------------------------------------- a step
    def _loss(self, student_output: torch.Tensor, teacher_output: torch.Tensor, ncrops: int):
        student_out = (student_output / self.student_temp).chunk(ncrops)
        self.teacher_temp = self.teacher_temp_at(self.epoch)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total, terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                terms += 1
        total /= terms
        self._update_center(teacher_output)
        return total

    @torch.no_grad()
    def _update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        _, size = world()
        if size > 1:
            dist.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)

    def _edit_gradients(self) -> None:
        if self.clip_grad:
            for _, p in self.student.named_parameters():
                if p.grad is not None:
                    clip_coef = self.clip_grad / (p.grad.data.norm(2) + 1e-6)
                    if clip_coef < 1:
                        p.grad.data.mul_(clip_coef)
        if self.epoch < self.freeze_last_layer:
            for n, p in self.student.named_parameters():
                if "last_layer" in n:
                    p.grad = None

    def _step(self, views: List[torch.Tensor], **kwargs) -> torch.Tensor:
        if len(views) < 2:
            raise PretrainError("dino needs at least the 2 global crops")
        with self.autocast():
            teacher_output = self.teacher(views[:2])
            student_output = self.student(views)
            loss = self._loss(student_output, teacher_output, len(views))
        self.backward_and_step(loss, before_step=self._edit_gradients)
        with torch.no_grad():
            m = self.ema
            for pq, pk in zip(self.student.parameters(), self.teacher.parameters()):
                pk.data.mul_(m).add_((1 - m) * pq.detach().data)
        return loss.detach()

    # ------------------------------------------------------------------------------- checkpoints
    def upstream_state_dict(self) -> Dict[str, Any]:
        teacher = self.teacher.state_dict()
        out = {
            "student": add_module(self.student.state_dict()),
            "teacher": add_module(teacher) if _has_bn(self.teacher) else teacher,
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "args": argparse.Namespace(arch=self.arch, out_dim=self.center.shape[1]),
            "dino_loss": {"center": self.center.clone()},
        }
        if self.scaler is not None:
            out["fp16_scaler"] = self.scaler.state_dict()
        return out

    def load_upstream(self, obj: Mapping[str, Any]) -> None:
        load_strict(self.student, strip_module(obj["student"]), "dino student")
        load_strict(self.teacher, strip_module(obj["teacher"]), "dino teacher")
        center = (obj.get("dino_loss") or {}).get("center")
        if center is not None:
            if tuple(center.shape) != tuple(self.center.shape):
                raise PretrainError(
                    f"dino center has shape {tuple(center.shape)}, expected "
                    f"{tuple(self.center.shape)}"
                )
            self.center = center.to(self.center)
        self.load_optimizer_state(obj.get("optimizer"))
        if self.scaler is not None and obj.get("fp16_scaler"):
            self.scaler.load_state_dict(obj["fp16_scaler"])

    def backbone(self) -> nn.Module:
        return self.teacher.backbone  # DINO's evaluations read the teacher (dino#44)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.teacher.backbone, x)

    def monitor_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.head.mlp(self.teacher.backbone(x))
