"""MAE (He et al., arXiv:2111.06377) as facebookresearch/mae pretrains it.

The module tree is ``MaskedAutoencoderViT``'s: encoder ``patch_embed``, ``cls_token``, fixed sin-cos
``pos_embed`` (first half of the channels from the token's column), ``blocks``, ``norm``; decoder
``decoder_embed``, ``mask_token``, fixed ``decoder_pos_embed``, ``decoder_blocks``,
``decoder_norm``, ``decoder_pred``. Masking is the repo's: per sample, argsort of uniform noise, the
first ``int(L * (1 - mask_ratio))`` patches are kept, the encoder sees only those (plus [cls]), the
decoder gets mask tokens at the others and predicts pixels; the loss is the per-patch MSE averaged
over the masked patches only, with ``norm_pix_loss`` targets normalised per patch by their mean and
sqrt(unbiased var + 1e-6). AdamW (0.9, 0.95), no decay on 1-D parameters and biases; lr warm-up then
half-cosine to ``min_lr``, per iteration.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from gridfeats.pretrain.base import PretrainError, PretrainMethod, load_strict, read_obj
from gridfeats.pretrain.vit import VIT_SIZES, Block, PatchEmbed, sincos_pos_embed

#: MAE's named models (models_mae.py): patch size per size; heads as VIT_SIZES
_MAE_PATCH = {"vit_base": 16, "vit_large": 16, "vit_huge": 14}
_ALIASES = {
    "mae_vit_base_patch16": "vit_base",
    "mae_vit_large_patch16": "vit_large",
    "mae_vit_huge_patch14": "vit_huge",
}
_SIZES = dict(VIT_SIZES, vit_huge=(1280, 32, 16))


class MAENet(nn.Module):
    """The repo's ``MaskedAutoencoderViT`` module tree (same registration order, same keys)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        n = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid, "col"), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(decoder_embed_dim, grid, "col"), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * 3)
        self.norm_pix_loss = norm_pix_loss
        assert self.pos_embed.shape[1] == n + 1
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, L, p*p*3], pixels of a patch in (row, col, channel) order."""
        p = self.patch_embed.patch_size
        if imgs.shape[2] != imgs.shape[3] or imgs.shape[2] % p:
            raise PretrainError(
                f"MAE needs square images divisible by {p}, got {tuple(imgs.shape)}"
            )
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * 3)

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the patches with the smallest noise; mask is 1 where a patch is removed."""
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        index = ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2])
        x = torch.cat([x[:, :1, :], torch.gather(x_, dim=1, index=index)], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder [cls] (patch tokens in image order, nothing dropped)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def _decoder_heads(dim: int, wanted: Optional[int], fallback: Optional[int]) -> int:
    for heads in (wanted, 16, fallback):
        if heads and dim % heads == 0:
            return heads
    raise PretrainError(f"pass decoder_num_heads: 16 does not divide the decoder width {dim}")


class MAE(PretrainMethod):
    name = "mae"
    hparams = ("lr", "weight_decay", "mask_ratio", "norm_pix_loss", "num_heads")

    def __init__(
        self,
        arch: str = "vit_base",
        checkpoint: Optional[Any] = None,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        num_heads: Optional[int] = None,
        decoder_num_heads: Optional[int] = None,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        warmup_epochs: float = 40,
        min_lr: float = 0.0,
        img_size: int = 224,
        patch_size: Optional[int] = None,
        precision: str = "fp32",
        device: str = "cpu",
    ):
        super().__init__(arch, precision, device)
        obj = read_obj(checkpoint)
        if obj is not None:
            kw = _sizes_from_state(obj["model"])
            self.arch = arch = f"vit_d{kw['embed_dim']}"
        else:
            arch = _ALIASES.get(arch, arch)
            if arch not in _SIZES:
                raise PretrainError(f"unknown MAE arch {arch!r}; known: {', '.join(_SIZES)}")
            dim, depth, _ = _SIZES[arch]
            kw = dict(
                img_size=img_size,
                patch_size=patch_size or _MAE_PATCH.get(arch, 16),
                embed_dim=dim,
                depth=depth,
                decoder_embed_dim=decoder_embed_dim,
                decoder_depth=decoder_depth,
            )
        heads = num_heads or _SIZES.get(arch, (0, 0, None))[2] or _heads_for(kw["embed_dim"])
        kw["decoder_num_heads"] = _decoder_heads(kw["decoder_embed_dim"], decoder_num_heads, heads)
        self.init_lr = self.lr = lr
        self.weight_decay, self.mask_ratio = weight_decay, mask_ratio
        self.warmup_epochs, self.min_lr = warmup_epochs, min_lr
        self.model = MAENet(num_heads=heads, norm_pix_loss=norm_pix_loss, **kw)
        self._finish(obj)

    @property
    def norm_pix_loss(self) -> bool:
        return self.model.norm_pix_loss

    def build_optimizer(self) -> torch.optim.Optimizer:
        """``add_weight_decay`` groups [no decay (1-D, biases), decay]; AdamW (0.9, 0.95)."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
        groups = [
            {"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": self.weight_decay},
        ]
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))

    def apply_hparams(self) -> None:
        no_decay, decay = self.optimizer.param_groups
        no_decay["lr"] = decay["lr"] = self.lr
        no_decay["weight_decay"], decay["weight_decay"] = 0.0, self.weight_decay

    def set_progress(self, epoch: float, epochs: int, iters_per_epoch: int = 0) -> None:
        """main_pretrain's per-iteration ``lr_sched.adjust_learning_rate``."""
        super().set_progress(epoch, epochs)
        if epoch < self.warmup_epochs:
            self.lr = self.init_lr * epoch / self.warmup_epochs
        else:
            t = (epoch - self.warmup_epochs) / (epochs - self.warmup_epochs)
            self.lr = self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (
                1.0 + math.cos(math.pi * t)
            )
        self.apply_hparams()

    def num_views(self) -> int:
        return 1

    def _step(self, views: List[torch.Tensor], noise: Optional[torch.Tensor] = None, **kw):
        (imgs,) = views
        n = imgs.shape[0]
        length = self.model.patch_embed.num_patches
        if noise is None:
            noise = torch.rand(n, length, device=imgs.device)
        elif tuple(noise.shape) != (n, length):
            raise PretrainError(f"noise must be [{n}, {length}], got {tuple(noise.shape)}")
        with self.autocast():
            loss, _, _ = self.model(imgs, self.mask_ratio, noise.to(imgs.device))
        self.backward_and_step(loss)
        return loss.detach()

    def upstream_state_dict(self) -> Dict[str, Any]:
        out = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
        }
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        out["args"] = argparse.Namespace(
            mask_ratio=self.mask_ratio,
            norm_pix_loss=self.norm_pix_loss,
            lr=self.init_lr,
            weight_decay=self.weight_decay,
        )
        return out

    def load_upstream(self, obj: Mapping[str, Any]) -> None:
        load_strict(self.model, obj["model"], "mae model")
        self.load_optimizer_state(obj.get("optimizer"))
        if self.scaler is not None and obj.get("scaler"):
            self.scaler.load_state_dict(obj["scaler"])

    def backbone(self) -> nn.Module:
        return self.model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def monitor_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _heads_for(dim: int) -> int:
    return {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}.get(dim, max(1, dim // 64))


def _sizes_from_state(state: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    def depth(prefix: str) -> int:
        idx = [
            int(k.split(".")[1])
            for k in state
            if k.startswith(prefix) and k.endswith("norm1.weight")
        ]
        return 1 + max(idx) if idx else 0

    proj = state["patch_embed.proj.weight"]
    n = state["pos_embed"].shape[1] - 1
    return dict(
        img_size=int(round(math.sqrt(n))) * proj.shape[-1],
        patch_size=proj.shape[-1],
        embed_dim=proj.shape[0],
        depth=depth("blocks."),
        decoder_embed_dim=state["decoder_embed.weight"].shape[0],
        decoder_depth=depth("decoder_blocks."),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0],
    )
