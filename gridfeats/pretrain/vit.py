"""The plain ViT the ViT pretraining methods train (MoCo v3, MAE, DINO), with timm's key names.

All three reference repos train the same network (pre-norm blocks, qkv with bias, 4x MLP with exact
GELU, LayerNorm eps 1e-6, a [cls] token and a Conv2d patch embedding); they differ only in the
position embedding (MoCo v3: fixed sin-cos with the first half of the channels from the token's row;
MAE: fixed sin-cos with the first half from its column; DINO: learned, bicubically resampled for
other crop sizes), the stochastic depth rate and the head. Key names are timm's
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}``, ``norm``, ``head``) so the repos' checkpoints load as they are.

Attention is written as the explicit matmul-softmax-matmul the repos run, not a fused kernel, so
that one training step reproduces theirs to float32 rounding (Adam turns tiny gradient differences
into full-size updates).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.modeling.backbone.vit import Mlp  # the same fc1 / GELU / fc2 keys and arithmetic

#: (embed_dim, depth, num_heads) of the named sizes. MoCo v3's ViT-S has 12 heads, DINO's 6
#: (the shapes cannot tell them apart, so callers pass ``num_heads`` when it differs).
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample; draws one uniform per sample, as the repos do (same RNG use)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches by a strided Conv2d, flattened row-major to [B, N, D]."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed(embed_dim: int, grid: int, first_half: str) -> torch.Tensor:
    """Fixed 2-D sin-cos table [1, 1 + grid**2, D] with a zero [cls] row.

    Channels are [sin, cos] of the first coordinate then [sin, cos] of the second, with
    omega_k = 10000^(-k/(D/4)). ``first_half="row"`` is MoCo v3's layout, ``"col"`` is MAE's; MAE
    builds its table in float64 and casts, MoCo v3 in float32, and so does this function.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    dtype = torch.float64 if first_half == "col" else torch.float32
    quarter = embed_dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=dtype) / quarter)
    index = torch.arange(grid * grid)
    rows, cols = (index // grid).to(dtype), (index % grid).to(dtype)
    first, second = (rows, cols) if first_half == "row" else (cols, rows)
    out1, out2 = first[:, None] * omega[None], second[:, None] * omega[None]
    table = torch.cat([out1.sin(), out1.cos(), out2.sin(), out2.cos()], dim=1)
    table = torch.cat([torch.zeros(1, embed_dim, dtype=dtype), table], dim=0)
    return table.float()[None]


def resample_pos_embed_dino(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` for an h x w patch grid (bicubic, scale_factor + 0.1)."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if n == h * w and h == w:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    h0, w0 = h + 0.1, w + 0.1
    patch = F.interpolate(patch, scale_factor=(h0 / side, w0 / side), mode="bicubic")
    if patch.shape[-2:] != (h, w):
        raise ValueError(f"position table resampled to {tuple(patch.shape[-2:])}, wanted {(h, w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


class VisionTransformer(nn.Module):
    """ViT with a [cls] token; ``forward`` returns ``head(norm(tokens)[:, 0])``.

    ``pos_embed`` is ``"sincos-row"`` (MoCo v3), ``"sincos-col"`` (MAE) or ``"learned"`` (DINO,
    which also resamples it for crops of another size; the fixed tables require the built image
    size). ``stop_grad_conv1`` freezes the patch projection (MoCo v3's "random patch
    projection").
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        pos_embed: str = "learned",
        stop_grad_conv1: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if pos_embed not in ("sincos-row", "sincos-col", "learned"):
            raise ValueError(f"unknown pos_embed {pos_embed!r}")
        self.embed_dim = embed_dim
        self.pos_embed_kind = pos_embed
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        grid = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            table = sincos_pos_embed(embed_dim, grid, pos_embed.split("-")[1])
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, True, rates[i], norm_eps) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head: nn.Module = nn.Identity()
        self._init_weights()
        if stop_grad_conv1:
            self.patch_embed.proj.weight.requires_grad = False
            self.patch_embed.proj.bias.requires_grad = False

    def _init_weights(self) -> None:
        """Xavier-uniform Linear weights (qkv as three D x D blocks) and patch projection, zero
        biases, cls ~ N(0, 1e-6) for the fixed tables (MoCo v3) and trunc-normal 0.02 otherwise."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        std = 1e-6 if self.pos_embed_kind == "sincos-row" else 0.02
        nn.init.normal_(self.cls_token, std=std)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """The position table for an h x w patch grid."""
        if self.pos_embed_kind == "learned":
            return resample_pos_embed_dino(self.pos_embed, h, w)
        if self.pos_embed.shape[1] - 1 != h * w:
            raise ValueError(
                f"this ViT was built for {self.patch_embed.img_size}px inputs (fixed sin-cos table "
                f"of {self.pos_embed.shape[1] - 1} patches); got a {h}x{w} patch grid"
            )
        return self.pos_embed

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, [B, 1 + N, D] ([cls] first)."""
        p = self.patch_embed.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed_for(h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The [cls] embedding, [B, D] (what the kNN monitor reads)."""
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def vit_from_state(
    state: dict,
    prefix: str = "",
    num_heads: Optional[int] = None,
    default_heads: int = 6,
    **kwargs,
) -> VisionTransformer:
    """Build the ViT whose sizes a state dict's shapes imply (heads cannot be read from shapes)."""
    proj = state[prefix + "patch_embed.proj.weight"]
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    n = state[prefix + "pos_embed"].shape[1] - 1
    depth = 1 + max(
        int(k[len(prefix) :].split(".")[1])
        for k in state
        if k.startswith(prefix + "blocks.") and k.endswith("norm1.weight")
    )
    mlp_hidden = state[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    return VisionTransformer(
        img_size=int(round(math.sqrt(n))) * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or default_heads,
        mlp_ratio=mlp_hidden / embed_dim,
        **kwargs,
    )


def vit_from_arch(
    arch: str, img_size: int = 224, patch_size: int = 16, num_heads: Optional[int] = None, **kwargs
) -> VisionTransformer:
    """``vit_tiny|vit_small|vit_base|vit_large`` at the given image and patch size."""
    if arch not in VIT_SIZES:
        raise ValueError(f"unknown ViT arch {arch!r}; known: {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[arch]
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads or heads,
        **kwargs,
    )
