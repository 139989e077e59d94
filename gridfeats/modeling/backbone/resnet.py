"""ResNet / ResNeXt backbone with Detectron2's module names (``stem``, ``res2`` .. ``res5``).

One file, read top to bottom: stem, bottleneck block (plain and deformable), stage builder, the
backbone, and the builder from a config. Facts that matter for parity: FrozenBN after every conv,
stride on the 1x1 (MSRA R-50) or on the 3x3 (ResNeXt), a projection shortcut only where channels
change, res5 dilation 2 with stride 1 for detection, and stride 2 / dilation 1 for grid extraction
with the same weights (chosen per call, see :meth:`ResNet.forward`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from gridfeats.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from gridfeats.modeling.backbone.backbone import Backbone
from gridfeats.modeling.backbone.build import BACKBONE_REGISTRY

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_NAMES = ("res2", "res3", "res4", "res5")


def _norm(norm: str, channels: int) -> Optional[nn.Module]:
    if norm in ("FrozenBN",):
        return FrozenBatchNorm2d(channels)
    if norm in ("BN",):
        return nn.BatchNorm2d(channels)
    if norm in ("", None):
        return None
    raise ValueError(f"unsupported MODEL.RESNETS.NORM {norm!r} (FrozenBN, BN or empty)")


class BasicStem(nn.Module):
    """7x7/2 conv + norm + ReLU + 3x3/2 max-pool: output stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN"):
        super().__init__()
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            7,
            stride=2,
            padding=3,
            bias=False,
            norm=_norm(norm, out_channels),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1, plus shortcut; ReLU after the sum.

    ``stride`` is the block's nominal stride; when the block runs dilated (dilation > 1) it runs
    with stride 1 instead, which is how Detectron2 builds res5 with RES5_DILATION = 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.dilation, self.stride_in_1x1 = stride, dilation, stride_in_1x1
        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                1,
                stride=stride,
                bias=False,
                norm=_norm(norm, out_channels),
            )
        else:
            self.shortcut = None
        self.conv1 = Conv2d(
            in_channels, bottleneck_channels, 1, bias=False, norm=_norm(norm, bottleneck_channels)
        )
        self._build_conv2(bottleneck_channels, num_groups, norm)
        self.conv3 = Conv2d(
            bottleneck_channels, out_channels, 1, bias=False, norm=_norm(norm, out_channels)
        )

    def _build_conv2(self, channels: int, num_groups: int, norm: str) -> None:
        self.conv2 = Conv2d(
            channels,
            channels,
            3,
            padding=self.dilation,
            bias=False,
            groups=num_groups,
            dilation=self.dilation,
            norm=_norm(norm, channels),
        )

    def _strides(self, dilation: int):
        stride = 1 if dilation > 1 else self.stride
        return (stride, 1) if self.stride_in_1x1 else (1, stride)

    def _conv2(self, x: torch.Tensor, stride: int, dilation: int) -> torch.Tensor:
        return self.conv2(x, stride=stride, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor, dilation: Optional[int] = None) -> torch.Tensor:
        d = self.dilation if dilation is None else dilation
        stride_1x1, stride_3x3 = self._strides(d)
        out = F.relu_(self.conv1(x, stride=stride_1x1))
        out = F.relu_(self._conv2(out, stride_3x3, d))
        out = self.conv3(out)
        shortcut = (
            x if self.shortcut is None else self.shortcut(x, stride=max(stride_1x1, stride_3x3))
        )
        out += shortcut
        return F.relu_(out)


class DeformBottleneckBlock(BottleneckBlock):
    """Bottleneck whose 3x3 is a deformable conv (DCNv1, or modulated DCNv2) fed by
    ``conv2_offset``.

    Offsets are predicted from the post-ReLU conv1 output; channel ``2t`` is the vertical and
    ``2t + 1`` the horizontal offset of kernel tap ``t``, the layout torchvision's kernel uses.
    """

    def __init__(self, *args, deform_modulated: bool = False, deform_num_groups: int = 1, **kwargs):
        self.deform_modulated = deform_modulated
        self.deform_num_groups = deform_num_groups
        super().__init__(*args, **kwargs)

    def _build_conv2(self, channels: int, num_groups: int, norm: str) -> None:
        per_group = 27 if self.deform_modulated else 18
        self.conv2_offset = Conv2d(
            channels,
            per_group * self.deform_num_groups,
            3,
            padding=self.dilation,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv2_offset.weight)
        nn.init.zeros_(self.conv2_offset.bias)
        self.conv2 = Conv2d(
            channels,
            channels,
            3,
            padding=self.dilation,
            bias=False,
            groups=num_groups,
            dilation=self.dilation,
            norm=_norm(norm, channels),
        )

    def _conv2(self, x: torch.Tensor, stride: int, dilation: int) -> torch.Tensor:
        offset = self.conv2_offset(x, stride=stride, padding=dilation, dilation=dilation)
        mask = None
        if self.deform_modulated:
            dy_dx, mask_logits = (
                offset[:, : 18 * self.deform_num_groups],
                offset[:, 18 * self.deform_num_groups :],
            )
            offset, mask = dy_dx, mask_logits.sigmoid()
        out = deform_conv2d(
            x,
            offset,
            self.conv2.weight,
            None,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            mask=mask,
        )
        return out if self.conv2.norm is None else self.conv2.norm(out)


def make_stage(
    num_blocks: int,
    in_channels: int,
    out_channels: int,
    bottleneck_channels: int,
    first_stride: int,
    deform: bool = False,
    **block_kwargs,
) -> nn.Sequential:
    """A stage of ``num_blocks`` blocks; only the first one strides and projects."""
    blocks: List[nn.Module] = []
    for i in range(num_blocks):
        kwargs = dict(block_kwargs)
        if not deform:
            kwargs.pop("deform_modulated", None)
            kwargs.pop("deform_num_groups", None)
        cls = DeformBottleneckBlock if deform else BottleneckBlock
        blocks.append(
            cls(
                in_channels,
                out_channels,
                bottleneck_channels,
                stride=first_stride if i == 0 else 1,
                **kwargs,
            )
        )
        in_channels = out_channels
    return nn.Sequential(*blocks)


class ResNet(Backbone):
    """Stem + stages up to the deepest requested output; returns ``{name: feature map}``.

    :meth:`grid_features` runs res5 with ``grid_res5_dilation`` (``MODEL.GRID.RES5_DILATION``).
    The default 1 is grid-feats-vqa's extraction rule: the same weights with res5 run undilated
    (stride 2 in its first block), giving the stride-32 C5 map.
    """

    #: grid-feats-vqa's ``extract_grid_feature.py`` forces this res5 dilation.
    GRID_RES5_DILATION = 1

    def __init__(
        self,
        stem: BasicStem,
        stages: Dict[str, nn.Sequential],
        out_features: Sequence[str],
        freeze_at: int = 0,
        grid_res5_dilation: int = GRID_RES5_DILATION,
    ):
        super().__init__()
        if grid_res5_dilation not in (1, 2):
            raise ValueError(f"the grid res5 dilation must be 1 or 2, got {grid_res5_dilation}")
        self.grid_res5_dilation = grid_res5_dilation
        self.stem = stem
        self.stage_names: List[str] = list(stages)
        for name, stage in stages.items():
            self.add_module(name, stage)
        self.out_features = list(out_features)
        self._out_channels = {"stem": stem.out_channels}
        self._out_strides = {"stem": 4}
        stride = 4
        for name, stage in stages.items():
            first = stage[0]
            stride *= first.stride if first.dilation == 1 else 1
            self._out_channels[name] = first.out_channels
            self._out_strides[name] = stride
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients for the stem (1) and the first ``freeze_at - 1`` stages (as
        Detectron2)."""
        if freeze_at >= 1:
            for p in self.stem.parameters():
                p.requires_grad_(False)
        for idx, name in enumerate(self.stage_names, start=2):
            if freeze_at >= idx:
                for p in getattr(self, name).parameters():
                    p.requires_grad_(False)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(self._out_channels[n], self._out_strides[n]) for n in self.out_features
        }

    def grid_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward(x, res5_dilation=self.grid_res5_dilation)

    def forward(
        self, x: torch.Tensor, res5_dilation: Optional[int] = None, return_all: bool = False
    ) -> Dict[str, torch.Tensor]:
        """Run the backbone. ``res5_dilation`` overrides the configured res5 dilation for this call
        (1 = grid-feats-vqa's stride-32 extraction); ``return_all`` also returns every stage."""
        outputs: Dict[str, torch.Tensor] = {}
        x = self.stem(x)
        if return_all or "stem" in self.out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            dilation = res5_dilation if name == "res5" else None
            for block in getattr(self, name):
                x = block(x, dilation=dilation)
            if return_all or name in self.out_features:
                outputs[name] = x
        return outputs


@BACKBONE_REGISTRY.register()
def build_resnet_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> ResNet:
    """Build from ``cfg.MODEL.RESNETS`` / ``cfg.MODEL.BACKBONE`` exactly as Detectron2 does."""
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH {depth} not supported (50, 101, 152)")
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}")
    in_channels = input_shape.channels if input_shape is not None else len(cfg.MODEL.PIXEL_MEAN)
    stem = BasicStem(in_channels, r.STEM_OUT_CHANNELS, r.NORM)
    out_features = list(r.OUT_FEATURES)
    max_stage = max(STAGE_NAMES.index(f) for f in out_features if f in STAGE_NAMES) + 2
    bottleneck = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    stages: Dict[str, nn.Sequential] = {}
    for stage_idx in range(2, max_stage + 1):
        dilation = r.RES5_DILATION if stage_idx == 5 else 1
        stage = make_stage(
            STAGE_BLOCKS[depth][stage_idx - 2],
            in_channels,
            out_channels,
            bottleneck,
            first_stride=2 if stage_idx > 2 else 1,  # a dilated block runs it as stride 1 itself
            deform=bool(r.DEFORM_ON_PER_STAGE[stage_idx - 2]),
            num_groups=r.NUM_GROUPS,
            norm=r.NORM,
            stride_in_1x1=r.STRIDE_IN_1X1,
            dilation=dilation,
            deform_modulated=r.DEFORM_MODULATED,
            deform_num_groups=r.DEFORM_NUM_GROUPS,
        )
        stages[f"res{stage_idx}"] = stage
        in_channels, out_channels, bottleneck = out_channels, out_channels * 2, bottleneck * 2
    return ResNet(
        stem,
        stages,
        out_features,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        grid_res5_dilation=cfg.MODEL.GRID.RES5_DILATION,
    )
