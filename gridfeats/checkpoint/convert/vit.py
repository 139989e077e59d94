"""timm-style ViT state dicts (MoCo v3, MAE, DINO) -> the project's ViT and its config.

The project's ViT uses the same module names, so the tensors keep their names; what the converter
adds is everything the file does not say by shape: the head count (``qkv`` is ``[3D, D]`` for any
count, and a wrong count loads ``strict=True`` and silently changes the features), LayerNorm eps,
the kind of position table and the source's rule for resizing it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from gridfeats.checkpoint.convert.errors import ConversionError

#: Head counts of the architecture names the repos record (``arch`` / ``args.arch`` /
#: ``args.model``). MoCo v3's ViT-S has 12 heads where DeiT's and DINO's have 6 (moco-v3#7).
HEADS_BY_ARCH: Dict[str, Dict[str, int]] = {
    "mocov3": {"vit_small": 12, "vit_base": 12, "vit_conv_small": 12, "vit_conv_base": 12},
    "mae": {
        "mae_vit_base_patch16": 12,
        "mae_vit_large_patch16": 16,
        "mae_vit_huge_patch14": 16,
        "vit_base_patch16": 12,
        "vit_large_patch16": 16,
        "vit_huge_patch14": 16,
    },
    "dino": {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "deit_tiny": 3, "deit_small": 6},
}

#: The LayerNorm eps every one of these repos' named ViT architectures uses (not in the file).
VIT_LN_EPS = 1e-6

#: The default way each source's stored table reaches other grids (docs/backbones.md).
POS_INTERP_OF_FORMAT = {"dino": "dino", "mocov3": "bicubic", "mae": "bicubic"}

_BACKBONE_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
    r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)
#: Tensors of ViT checkpoints that are not backbone: projector/classifier heads, MAE's decoder.
_NOT_BACKBONE = re.compile(r"^(head\.|head$|fc_norm\.|pre_logits\.|mask_token$|decoder_)")


def is_timm_vit(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("patch_embed.") for k in state) and any(
        k.startswith("blocks.") for k in state
    )


def split_vit(
    state: Mapping[str, torch.Tensor],
) -> Tuple["OrderedDict[str, torch.Tensor]", List[str]]:
    """``(backbone tensors, dropped keys)``; a tensor that is neither is an error."""
    if any(k.startswith("patch_embed.proj.") and k.count(".") > 2 for k in state):
        raise ConversionError(
            "this ViT has a convolutional stem (MoCo v3's vit_conv_*: patch_embed.proj.0...), "
            "which the project's ViT does not implement"
        )
    kept: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dropped: List[str] = []
    unknown: List[str] = []
    for key, value in state.items():
        if _BACKBONE_KEY.match(key):
            kept[key] = value
        elif _NOT_BACKBONE.match(key):
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"ViT tensors the project's ViT has no place for: {', '.join(unknown[:8])}"
            + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
            + " (a distilled DeiT or another variant?)"
        )
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        if required not in kept:
            raise ConversionError(f"ViT checkpoint without {required!r}: not a complete encoder")
    return kept, dropped


def pos_embed_kind(pos_embed: torch.Tensor) -> str:
    """``"sincos-rows-first"`` (MoCo v3), ``"sincos-cols-first"`` (MAE) or ``"learned"``: which
    fixed 2-D sin-cos table the stored one equals, if any (cls row excluded)."""
    from gridfeats.modeling.backbone.vit import sincos_2d_pos_embed

    table = pos_embed[0, 1:].float()
    side = round(table.shape[0] ** 0.5)
    dim = table.shape[1]
    if side * side != table.shape[0] or dim % 4:
        return "learned"
    for kind in ("sincos-rows-first", "sincos-cols-first"):
        if torch.allclose(table, sincos_2d_pos_embed((side, side), dim, kind), atol=1e-4):
            return kind
    return "learned"


def resolve_num_heads(
    fmt: str,
    arch: Optional[str],
    num_heads: Optional[int],
    recorded: Optional[int] = None,
) -> Tuple[int, str]:
    """The head count and where it came from; refuses to guess (the message names the flag)."""
    known = recorded
    origin = "the checkpoint's recorded config"
    if known is None and arch is not None:
        known = HEADS_BY_ARCH.get(fmt, {}).get(str(arch))
        origin = f"{fmt}'s architecture {arch!r}"
    if num_heads is not None:
        if known is not None and known != num_heads:
            raise ConversionError(
                f"--num-heads {num_heads} contradicts {origin}, which has {known} heads"
            )
        return num_heads, "--num-heads"
    if known is None:
        what = f"architecture {arch!r} is not a known {fmt} ViT" if arch else "no architecture name"
        raise ConversionError(
            f"the ViT's head count cannot be read from the weights ({what}; qkv is [3D, D] for "
            "any count, and a wrong count silently changes the features): pass --num-heads N "
            "(e.g. 6 for DINO/DeiT ViT-S, 12 for MoCo v3 ViT-S and every ViT-B)"
        )
    return known, origin


def vit_config(
    state: Mapping[str, torch.Tensor], num_heads: int, pos_interp: str
) -> Dict[str, object]:
    """``MODEL.VIT.*`` values for project-named ViT tensors."""
    proj = state["patch_embed.proj.weight"]
    dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    if ph != pw:
        raise ConversionError(f"non-square patches {ph}x{pw} are not supported")
    if in_chans != 3:
        raise ConversionError(f"the patch embedding takes {in_chans} channels, not RGB's 3")
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    num_positions = int(state["pos_embed"].shape[1]) - 1
    grid = round(num_positions**0.5)
    if grid * grid != num_positions:
        raise ConversionError(f"the position table has {num_positions} rows: not a square grid")
    if dim % num_heads:
        raise ConversionError(f"width {dim} is not divisible by {num_heads} heads")
    kind = pos_embed_kind(state["pos_embed"])
    if pos_interp == "sincos" and kind == "learned":
        raise ConversionError(
            "POS_INTERP 'sincos' needs a fixed sin-cos table; this one is learned"
        )
    return {
        "MODEL.BACKBONE.NAME": "build_vit_backbone",
        "MODEL.VIT.PATCH_SIZE": ph,
        "MODEL.VIT.EMBED_DIM": dim,
        "MODEL.VIT.DEPTH": depth,
        "MODEL.VIT.NUM_HEADS": num_heads,
        "MODEL.VIT.MLP_RATIO": float(state["blocks.0.mlp.fc1.weight"].shape[0]) / dim,
        "MODEL.VIT.QKV_BIAS": "blocks.0.attn.qkv.bias" in state,
        "MODEL.VIT.LN_EPS": VIT_LN_EPS,
        "MODEL.VIT.PRETRAIN_GRID": grid,
        "MODEL.VIT.POS_EMBED": kind,
        "MODEL.VIT.POS_INTERP": pos_interp,
    }


def describe_vit(config: Mapping[str, object]) -> str:
    c = {k.rsplit(".", 1)[-1]: v for k, v in config.items() if k.startswith("MODEL.VIT.")}
    return (
        f"ViT patch {c['PATCH_SIZE']}, width {c['EMBED_DIM']}, depth {c['DEPTH']}, "
        f"{c['NUM_HEADS']} heads, LayerNorm eps {c['LN_EPS']:g}, qkv bias {c['QKV_BIAS']}, "
        f"{c['POS_EMBED']} position table for a {c['PRETRAIN_GRID']}x{c['PRETRAIN_GRID']} grid, "
        f"resized by the {c['POS_INTERP']!r} rule"
    )
