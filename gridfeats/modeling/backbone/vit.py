"""Plain Vision Transformer backbone (timm / DeiT module names), for grids and the detector.

One file, read top to bottom: the position-embedding rules, patch embedding, attention, MLP, the
pre-norm block, the backbone, and its builder from ``cfg.MODEL.VIT``. The module names are the
ones MoCo v3, MAE and DINO checkpoints use (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so their backbones load
without renaming once their wrapper prefixes are stripped.

Why several position-embedding rules: a table stored for a 14x14 grid has to be resized for any
other input, and each source does it its own way (docs/backbones.md). The features only equal the
source model's own when the source's rule is used:

* ``"dino"``: DINO's ``interpolate_pos_encoding``: unchanged when the patch count matches and the
  input is square; otherwise bicubic ``scale_factor=((H//p + 0.1) / s, (W//p + 0.1) / s)``.
* ``"bicubic"``: bicubic ``size=(H//p, W//p)``, ``align_corners=False`` (MAE's fine-tuning code,
  ViTDet; the default for MoCo v3 and MAE).
* ``"sincos"``: the fixed 2-D sin-cos table recomputed for the new grid, in the channel layout of
  the source (``MODEL.VIT.POS_EMBED``: MoCo v3 puts the row first, MAE the column).

Input size: images are padded at the bottom and right with zeros (the mean colour after
normalisation) up to a multiple of the patch size, so the grid is ``ceil(H/p) x ceil(W/p)``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.layers import ShapeSpec
from gridfeats.modeling.backbone.backbone import Backbone
from gridfeats.modeling.backbone.build import BACKBONE_REGISTRY

#: Stored table kinds: learned (DINO, fine-tuned models) or a fixed sin-cos in one channel layout.
POS_EMBED_KINDS = ("learned", "sincos-rows-first", "sincos-cols-first")
#: How the stored table reaches another grid (see the module docstring).
POS_INTERP_RULES = ("dino", "bicubic", "sincos")
#: Name of the single feature map the ViT backbones return (ViTDet's name for it).
VIT_OUT_FEATURE = "last_feat"


# -------------------------------------------------------------------------------------------------
# Position embeddings
# -------------------------------------------------------------------------------------------------
def sincos_2d_pos_embed(
    grid_hw: Tuple[int, int], dim: int, layout: str, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[gh * gw, dim]`` in row-major token order (no cls row).

    Each axis gets ``dim / 2`` channels ``[sin(t * w_k), cos(t * w_k)]`` with
    ``w_k = temperature ** (-k / (dim / 4))``; ``"sincos-rows-first"`` (MoCo v3) puts the row
    index's half first, ``"sincos-cols-first"`` (MAE) the column's. Computed in float64 (as MAE's
    numpy code) and returned as float32.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid_hw
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )

    def axis(t: torch.Tensor) -> torch.Tensor:
        out = t.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    if layout == "sincos-rows-first":
        table = torch.cat([axis(rows), axis(cols)], dim=1)
    elif layout == "sincos-cols-first":
        table = torch.cat([axis(cols), axis(rows)], dim=1)
    else:
        raise ValueError(f"unknown sin-cos layout {layout!r} (one of {POS_EMBED_KINDS[1:]})")
    return table.float()


def _table_side(num_positions: int) -> int:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"a stored position table of {num_positions} patches is not square")
    return side


def resize_pos_embed_bicubic(table: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """``[N, D]`` square table -> ``[gh * gw, D]``: size-based bicubic, ``align_corners=False``."""
    side = _table_side(table.shape[0])
    if tuple(grid_hw) == (side, side):
        return table
    grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(grid_hw[0] * grid_hw[1], -1)


def resize_pos_embed_dino(
    table: torch.Tensor, grid_hw: Tuple[int, int], image_hw: Tuple[int, int]
) -> torch.Tensor:
    """DINO's rule: ``scale_factor = (g + 0.1) / sqrt(N)`` per axis, bicubic, default corners.

    The given scale factor is also used for the coordinate mapping (torch >= 1.6), so the result
    differs from ``size=`` even where the row or column count does not change.
    """
    side = _table_side(table.shape[0])
    gh, gw = grid_hw
    if gh * gw == side * side and image_hw[0] == image_hw[1]:
        return table
    grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((gh + 0.1) / math.sqrt(side * side), (gw + 0.1) / math.sqrt(side * side))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    if tuple(grid.shape[-2:]) != (gh, gw):
        raise RuntimeError(f"DINO interpolation gave {tuple(grid.shape[-2:])}, expected {grid_hw}")
    return grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)


# -------------------------------------------------------------------------------------------------
# Layers
# -------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> ``D`` channels (one strided conv)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (timm's layout: q, k, v)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample (identity at inference)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        ln_eps: float,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


# -------------------------------------------------------------------------------------------------
# Backbone
# -------------------------------------------------------------------------------------------------
class VisionTransformer(Backbone):
    """Patch embedding + cls token + absolute positions + pre-norm blocks + final norm.

    ``forward(x)`` returns ``{"last_feat": [N, D, ceil(H/p), ceil(W/p)]}``: the patch tokens after
    the final norm (cls token dropped) laid out as a stride-``p`` map; grid extraction reads the
    same map and the detector's RPN and box head read it too.
    """

    def __init__(
        self,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_eps: float = 1e-6,
        pretrain_grid: int = 14,
        pos_embed: str = "learned",
        pos_interp: str = "bicubic",
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        out_feature: str = VIT_OUT_FEATURE,
    ):
        super().__init__()
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"MODEL.VIT.POS_EMBED {pos_embed!r} not in {POS_EMBED_KINDS}")
        if pos_interp not in POS_INTERP_RULES:
            raise ValueError(f"MODEL.VIT.POS_INTERP {pos_interp!r} not in {POS_INTERP_RULES}")
        if pos_interp == "sincos" and pos_embed == "learned":
            raise ValueError(
                "MODEL.VIT.POS_INTERP 'sincos' recomputes a fixed sin-cos table; a learned table "
                "(MODEL.VIT.POS_EMBED 'learned') can only be interpolated ('dino' or 'bicubic')"
            )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.pretrain_grid = pretrain_grid
        self.pos_embed_kind = pos_embed
        self.pos_interp = pos_interp
        self.out_feature = out_feature
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, embed_dim))
        # Stochastic depth rising linearly from 0 to drop_path_rate over the blocks (timm's rule).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, ln_eps, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed_kind == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            # Fixed table (MoCo v3 / MAE keep it frozen): cls row 0, then the sin-cos grid.
            table = sincos_2d_pos_embed(
                (self.pretrain_grid,) * 2, self.embed_dim, self.pos_embed_kind
            )
            with torch.no_grad():
                self.pos_embed.zero_()
                self.pos_embed[0, 1:] = table
            self.pos_embed.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- Backbone interface ------------------------------------------------------------------------
    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {self.out_feature: ShapeSpec(channels=self.embed_dim, stride=self.patch_size)}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        tokens, (gh, gw) = self.forward_tokens(x)
        patches = tokens[:, 1:]
        grid = patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, gh, gw)
        return {self.out_feature: grid}

    def grid_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward(x)

    # -- tokens ------------------------------------------------------------------------------------
    def pad_to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right to a multiple of the patch size (0 = mean colour)."""
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def position_table(self, grid_hw: Tuple[int, int], image_hw: Tuple[int, int]) -> torch.Tensor:
        """The ``[1, 1 + gh * gw, D]`` position embedding for a ``grid_hw`` patch grid."""
        cls_pos, table = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        if self.pos_interp == "dino":
            patches = resize_pos_embed_dino(table, grid_hw, image_hw)
        elif self.pos_interp == "bicubic":
            patches = resize_pos_embed_bicubic(table, grid_hw)
        elif tuple(grid_hw) == (self.pretrain_grid,) * 2:
            patches = table
        else:
            patches = sincos_2d_pos_embed(grid_hw, self.embed_dim, self.pos_embed_kind).to(table)
        return torch.cat([cls_pos, patches.unsqueeze(0).to(cls_pos.dtype)], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """All tokens after the final norm ``[N, 1 + gh * gw, D]`` (cls first) and the grid size."""
        x = self.pad_to_patches(x)
        image_hw = (x.shape[-2], x.shape[-1])
        patches = self.patch_embed(x)
        gh, gw = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.position_table((gh, gw), image_hw)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens), (int(gh), int(gw))


@BACKBONE_REGISTRY.register()
def build_vit_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> VisionTransformer:
    """Build from ``cfg.MODEL.VIT`` (written by ``gridfeats convert-backbone`` for ViT sources)."""
    v = cfg.MODEL.VIT
    in_chans = input_shape.channels if input_shape is not None else len(cfg.MODEL.PIXEL_MEAN)
    return VisionTransformer(
        patch_size=v.PATCH_SIZE,
        embed_dim=v.EMBED_DIM,
        depth=v.DEPTH,
        num_heads=v.NUM_HEADS,
        mlp_ratio=v.MLP_RATIO,
        qkv_bias=v.QKV_BIAS,
        ln_eps=v.LN_EPS,
        pretrain_grid=v.PRETRAIN_GRID,
        pos_embed=v.POS_EMBED,
        pos_interp=v.POS_INTERP,
        drop_path_rate=v.DROP_PATH_RATE,
        in_chans=in_chans,
        out_feature=VIT_OUT_FEATURE,
    )
