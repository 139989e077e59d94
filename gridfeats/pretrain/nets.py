"""Backbones and heads of the pretraining methods, built so their state-dict keys are the repos'.

ResNets are torchvision's (every ResNet recipe uses ``torchvision.models.resnet*``), chosen by name
or read off a checkpoint's keys (block type and per-stage block counts). Heads follow the repos'
module layouts exactly (``nn.Sequential`` indices are part of the key names), see
``docs/pretrain.md`` and ``../shared/docs/ssl-backbones.md`` section 2.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch
import torchvision
from torch import nn

from gridfeats.pretrain.vit import VIT_SIZES

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_RESNET_LAYERS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


def is_vit(arch: str) -> bool:
    return arch.startswith("vit")


def check_arch(arch: str) -> str:
    if arch not in RESNET_ARCHS and arch not in VIT_SIZES:
        raise ValueError(
            f"unknown --arch {arch!r}; known: {', '.join(RESNET_ARCHS + tuple(VIT_SIZES))}"
        )
    return arch


def resnet(arch: str, **kwargs) -> torchvision.models.ResNet:
    """torchvision's ResNet by name (``num_classes``, ``zero_init_residual`` as the repos pass)."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet arch {arch!r}; known: {', '.join(RESNET_ARCHS)}")
    return getattr(torchvision.models, arch)(weights=None, **kwargs)


def resnet_arch_from_state(state: Dict[str, torch.Tensor], prefix: str) -> str:
    """Which torchvision ResNet a state dict holds under ``prefix`` (e.g. ``encoder.``)."""
    counts = []
    for stage in range(1, 5):
        pattern = re.compile(re.escape(prefix) + rf"layer{stage}\.(\d+)\.conv1\.weight$")
        idx = [int(m.group(1)) for k in state if (m := pattern.match(k))]
        counts.append(max(idx) + 1 if idx else 0)
    bottleneck = any(k.startswith(prefix + "layer1.0.conv3.") for k in state)
    arch = _RESNET_LAYERS.get((bottleneck, tuple(counts)))
    if arch is None:
        raise ValueError(f"no torchvision ResNet has the blocks {counts} found under {prefix!r}")
    return arch


def resnet_feature_dim(net: torchvision.models.ResNet) -> int:
    """Channels after global pooling (512 for R-18/34, 2048 for R-50+)."""
    last = net.layer4[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def backbone_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled backbone output the kNN monitor reads: ResNet avgpool, ViT [cls] after norm."""
    if hasattr(net, "forward_features"):
        return net.forward_features(x)
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
    return torch.flatten(net.avgpool(x), 1)


def mlp_mocov3(
    num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """MoCo v3's MLP: (Linear no bias, BN, ReLU) x (n-1), Linear no bias, [BN(affine=False)]."""
    layers = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


def simsiam_projector(prev_dim: int, dim: int) -> nn.Sequential:
    """SimSiam's 3-layer projector; index 6 is the original fc (its bias is kept but frozen)."""
    proj = nn.Sequential(
        nn.Linear(prev_dim, prev_dim, bias=False),
        nn.BatchNorm1d(prev_dim),
        nn.ReLU(inplace=True),
        nn.Linear(prev_dim, prev_dim, bias=False),
        nn.BatchNorm1d(prev_dim),
        nn.ReLU(inplace=True),
        nn.Linear(prev_dim, dim),
        nn.BatchNorm1d(dim, affine=False),
    )
    proj[6].bias.requires_grad = False  # followed by BN: the bias would only shift the mean
    return proj


def simsiam_predictor(dim: int, pred_dim: int) -> nn.Sequential:
    """SimSiam's bottleneck predictor dim -> pred_dim -> dim (last Linear with bias)."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False),
        nn.BatchNorm1d(pred_dim),
        nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim),
    )


class DINOHead(nn.Module):
    """MLP (GELU, optional BN) to a bottleneck, l2-normalise, weight-normalised last layer.

    ``last_layer`` is ``torch.nn.utils.weight_norm`` so its keys are ``weight_g`` / ``weight_v``
    as in DINO's checkpoints; with ``norm_last_layer`` the magnitude ``weight_g`` stays at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for i in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                last = i == nlayers - 2
                layers.append(nn.Linear(hidden_dim, bottleneck_dim if last else hidden_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the keys are the point (weight_g/v)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))


def dino_head_from_state(
    state: Dict[str, torch.Tensor], prefix: str, norm_last_layer: Optional[bool] = None
) -> DINOHead:
    """The DINOHead a state dict holds under ``prefix`` (``head.``)."""
    linear = sorted(
        int(m.group(1))
        for k in state
        if (m := re.match(re.escape(prefix) + r"mlp\.(\d+)\.weight$", k)) and state[k].ndim == 2
    )
    out_dim, bottleneck_dim = state[prefix + "last_layer.weight_v"].shape
    if not linear:  # nlayers == 1: mlp is a bare Linear
        in_dim = state[prefix + "mlp.weight"].shape[1]
        return DINOHead(
            in_dim,
            out_dim,
            nlayers=1,
            bottleneck_dim=bottleneck_dim,
            norm_last_layer=norm_last_layer is not False,
        )
    first = state[f"{prefix}mlp.{linear[0]}.weight"]
    use_bn = f"{prefix}mlp.1.running_mean" in state
    return DINOHead(
        first.shape[1],
        out_dim,
        use_bn=use_bn,
        norm_last_layer=norm_last_layer is not False,
        nlayers=len(linear),
        hidden_dim=first.shape[0],
        bottleneck_dim=bottleneck_dim,
    )
