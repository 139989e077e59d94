"""The source repos' own models, written here from docs/backbones.md (their code is not a
dependency): torchvision's ResNet forward to layer4, and a timm-0.4.9-style ViT with each repo's
position-embedding rule and sin-cos table. Tests compare the converted backbones with these."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_tensor_normalize(rgb: np.ndarray) -> torch.Tensor:
    """torchvision's ``ToTensor`` then ``Normalize(ImageNet)``: the SSL repos' preprocessing."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# -------------------------------------------------------------------------------------------------
# ResNet
# -------------------------------------------------------------------------------------------------
def seeded_resnet50(seed: int, **kwargs) -> torchvision.models.ResNet:
    """torchvision resnet50 with random weights and non-trivial BN statistics (eval mode)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1000)
    return model.eval()


def resnet_layer4(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
    return x


# -------------------------------------------------------------------------------------------------
# ViT (timm 0.4.9 / DINO names and math)
# -------------------------------------------------------------------------------------------------
def mocov3_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's ``build_2d_sincos_position_embedding`` (square grid), with the zero cls row."""
    grid_w = torch.arange(grid, dtype=torch.float32)
    grid_h = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb], dim=0).unsqueeze(0)


def _mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_sincos(grid: int, dim: int) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed(dim, grid, cls_token=True)`` as float32."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([_mae_1d(dim // 2, mesh[0]), _mae_1d(dim // 2, mesh[1])], axis=1)
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class RefViT(nn.Module):
    """A ViT the way MoCo v3 (timm 0.4.9), MAE (timm 0.3.2) and DINO build it.

    ``table``: "learned" (DINO), "mocov3" or "mae" (fixed sin-cos, ``requires_grad=False``).
    """

    def __init__(self, seed: int, dim: int, depth: int, heads: int, table: str, patch: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.patch, grid = patch, 224 // patch
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        if table == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        else:
            sincos = mocov3_sincos(grid, dim) if table == "mocov3" else mae_sincos(grid, dim)
            self.pos_embed = nn.Parameter(sincos, requires_grad=False)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        with torch.no_grad():  # trained-looking norms and biases instead of 1 / 0
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.05)
                elif "norm" in name:
                    p.uniform_(0.5, 1.5)
        self.eval()

    # DINO's vision_transformer.py, with its own variable names (``w`` is the height).
    def dino_interpolate_pos_encoding(self, x, w, h):
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        class_pos_embed, patch_pos_embed = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch + 0.1, h // self.patch + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(
                0, 3, 1, 2
            ),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    # Detectron2 ViTDet's get_abs_pos (what MAE fine-tuning and ViTDet do), cls row kept as is.
    def bicubic_pos(self, hw: Tuple[int, int]):
        abs_pos = self.pos_embed[:, 1:]
        size = int(math.sqrt(abs_pos.shape[1]))
        if (size, size) != tuple(hw):
            new = F.interpolate(
                abs_pos.reshape(1, size, size, -1).permute(0, 3, 1, 2),
                size=hw,
                mode="bicubic",
                align_corners=False,
            )
            abs_pos = new.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], -1)
        return torch.cat([self.pos_embed[:, :1], abs_pos], dim=1)

    @torch.no_grad()
    def patch_tokens(self, x: torch.Tensor, rule: str) -> torch.Tensor:
        """Final-norm patch tokens as ``[D, H/p, W/p]`` (batch of one)."""
        _, _, w, h = x.shape
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        gh, gw = x.shape[2] // self.patch, x.shape[3] // self.patch
        pos = (
            self.dino_interpolate_pos_encoding(tokens, w, h)
            if rule == "dino"
            else (self.bicubic_pos((gh, gw)))
        )
        tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)[0, 1:]
        return tokens.transpose(0, 1).reshape(-1, gh, gw)
