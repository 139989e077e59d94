"""Recognise a checkpoint's on-disk layout and take out its backbone branch.

Every SSL trainer wraps the backbone differently (docs/backbones.md, "Containers"): MoCo, SimSiam
and MoCo v3 save ``{"state_dict": ...}`` with DDP's ``module.`` and a branch prefix per encoder,
MAE saves ``{"model": ...}`` with its decoder, DINO saves student and teacher, released files are
often plain state dicts. :func:`recognise` unwraps the container, strips ``module.``, picks the
branch that fine-tuning uses (query / base encoder, the teacher), and returns the backbone
tensors under their source names with a record of everything it dropped and why.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from gridfeats.checkpoint.convert import resnet, vit
from gridfeats.checkpoint.convert.errors import ConversionError

FORMATS = (
    "auto",
    "torchvision",
    "moco",
    "simsiam",
    "mocov3",
    "mae",
    "dino",
    "hf",
    "detectron2",
    "gridfeats-pretrain",
)

#: format -> (kept branch prefix, dropped sibling prefixes, what the branch is).
BRANCHES: Dict[str, Tuple[str, Tuple[str, ...], str]] = {
    "moco": ("encoder_q.", ("encoder_k.", "queue", "queue_ptr"), "query encoder"),
    "simsiam": ("encoder.", ("predictor.",), "encoder"),
    "mocov3": ("base_encoder.", ("momentum_encoder.", "predictor."), "base encoder"),
    "dino": ("backbone.", ("head.",), "backbone"),
}


@dataclass
class Recognised:
    """A checkpoint's backbone, under source names (wrapper prefixes stripped)."""

    format: str
    layout: str  # what was found, in words
    branch: str  # what was kept, in words
    state: "OrderedDict[str, torch.Tensor]"
    dropped: List[str] = field(default_factory=list)  # original keys left out
    arch: Optional[str] = None  # recorded architecture name, if any
    recorded_config: Dict[str, Any] = field(default_factory=dict)  # gridfeats-pretrain "config"


def _tensors(state: Mapping[str, Any], where: str) -> "OrderedDict[str, torch.Tensor]":
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = value
    return out


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict(
        (k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in state.items()
    )


def _arg(args: Any, name: str) -> Optional[Any]:
    if isinstance(args, argparse.Namespace):
        return getattr(args, name, None)
    if isinstance(args, Mapping):
        return args.get(name)
    return None


def _unwrap(obj: Any, fmt: str) -> Tuple[Mapping[str, Any], str, Optional[str], str, Dict]:
    """``(state, container description, arch, format hint, recorded config)``."""
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a dict, found a {type(obj).__name__}: not a checkpoint")
    if "teacher" in obj and "student" in obj:
        if not isinstance(obj["teacher"], Mapping):
            raise ConversionError("'teacher' is not a state dict")
        args = obj.get("args")
        arch = _arg(args, "arch")
        return obj["teacher"], "DINO training checkpoint (student + teacher)", arch, "dino", {}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        arch = obj.get("arch")
        return obj["state_dict"], "training checkpoint {'state_dict': ...}", arch, "", {}
    if "model" in obj and isinstance(obj["model"], Mapping):
        if "method" in obj or fmt == "gridfeats-pretrain":
            recorded = obj.get("config") or {}
            if not isinstance(recorded, Mapping):
                raise ConversionError("gridfeats-pretrain checkpoint: 'config' is not a dict")
            return (
                obj["model"],
                f"gridfeats pretraining checkpoint (method {obj.get('method')!r})",
                obj.get("arch"),
                "gridfeats-pretrain",
                dict(recorded),
            )
        arch = _arg(obj.get("args"), "model") or obj.get("arch")
        return obj["model"], "checkpoint {'model': ...}", arch, "", {}
    return obj, "plain state dict", None, "", {}


def _present_branches(state: Mapping[str, torch.Tensor]) -> List[str]:
    found = []
    for name, (prefix, _, _) in BRANCHES.items():
        if any(k.startswith(prefix) for k in state):
            found.append(name)
    return found


def _is_detectron2_model(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("proposal_generator.", "roi_heads.")) for k in state) or (
        resnet.is_project_resnet(_strip(state, "backbone."))
    )


def _take_branch(
    state: "OrderedDict[str, torch.Tensor]", fmt: str
) -> Tuple["OrderedDict[str, torch.Tensor]", List[str], str]:
    prefix, siblings, what = BRANCHES[fmt]
    kept: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dropped: List[str] = []
    unknown: List[str] = []
    for key, value in state.items():
        if key.startswith(prefix):
            kept[key[len(prefix) :]] = value
        elif key.startswith(siblings):
            dropped.append(key)
        else:
            unknown.append(key)
    if not kept:
        raise ConversionError(
            f"--format {fmt}: no tensor starts with '{prefix}' (or 'module.{prefix}'): this is "
            "not that layout, or it holds no backbone"
        )
    if unknown:
        raise ConversionError(
            f"{fmt} layout with tensors outside '{prefix}' and {', '.join(siblings)}: "
            f"{', '.join(unknown[:8])}; refusing to guess which part is the backbone"
        )
    return kept, dropped, f"{what} '{prefix}' ({len(kept)} tensors)"


def _detectron2(
    state: "OrderedDict[str, torch.Tensor]", container: str, arch: Optional[str]
) -> Recognised:
    """A Detectron2 model (``backbone.*``, a C4 head's ``roi_heads.res5.*``) or a bare backbone."""
    inside = ("backbone.", "roi_heads.res5.")
    if any(k.startswith(inside) for k in state):
        kept: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for key, value in state.items():
            if key.startswith("backbone."):
                kept[key[len("backbone.") :]] = value
            elif key.startswith("roi_heads.res5."):
                kept[key[len("roi_heads.") :]] = value
        dropped = [k for k in state if not k.startswith(inside)]
        branch = "backbone" + (
            " and the C4 box head's res5 stage"
            if any(k.startswith(inside[1]) for k in state)
            else ""
        )
    elif resnet.is_project_resnet(state):
        kept, dropped, branch = state, [], "all of it (bare backbone names)"
    else:
        raise ConversionError(f"Detectron2 layout without backbone tensors ({container})")
    return Recognised("detectron2", f"Detectron2 model, {container}", branch, kept, dropped, arch)


def _vit_format(state: Mapping[str, torch.Tensor], wrapped: bool) -> Tuple[str, str]:
    """Which ViT source a backbone-only ViT file is, from its position table (and MAE's decoder)."""
    if "mask_token" in state or any(k.startswith("decoder_") for k in state):
        return "mae", "MAE pretraining model (encoder + decoder)"
    kind = vit.pos_embed_kind(state["pos_embed"]) if "pos_embed" in state else "learned"
    if kind == "sincos-cols-first":
        return "mae", "ViT with MAE's fixed sin-cos table (column first): MAE encoder file"
    if kind == "sincos-rows-first":
        return "mocov3", "ViT with MoCo v3's fixed sin-cos table (row first): MoCo v3 encoder"
    if not wrapped:
        return "dino", "plain ViT state dict with a learned position table: DINO backbone file"
    raise ConversionError(
        "a {'model': ...} ViT with a learned position table could be several sources (DeiT, a "
        "fine-tuned model, DINO): pass --format dino|mae|mocov3 to say whose resize rule applies"
    )


def recognise(obj: Any, fmt: str = "auto") -> Recognised:
    """Find the backbone in a loaded ``.pth`` object (see the module docstring)."""
    if fmt not in FORMATS or fmt in ("hf",):
        raise ConversionError(f"--format {fmt!r} does not apply to a checkpoint file")
    inner, container, arch, hint, recorded = _unwrap(obj, fmt)
    state = _tensors(inner, container)
    if not state:
        raise ConversionError(f"{container} holds no tensors: no backbone")
    had_module = any(k.startswith("module.") for k in state)
    state = _strip(state, "module.")
    wrapped = container != "plain state dict"
    if had_module:
        container += ", DDP 'module.' prefix"

    if hint == "gridfeats-pretrain" or fmt == "gridfeats-pretrain":
        if hint != "gridfeats-pretrain":
            raise ConversionError(
                "--format gridfeats-pretrain: expected {'model': ..., 'arch': ..., 'method': ...}"
            )
        if all(k.startswith("backbone.") for k in state):
            state = _strip(state, "backbone.")
        return Recognised(
            "gridfeats-pretrain",
            container,
            "the whole model (backbone only)",
            state,
            [],
            arch,
            recorded,
        )

    if fmt == "detectron2" or (fmt == "auto" and hint == "" and _is_detectron2_model(state)):
        return _detectron2(state, container, arch)

    branches = _present_branches(state)
    if fmt == "auto" and hint == "dino":
        branches = ["dino"]
    # A forced format whose branch prefix is absent reads the file as a backbone-only file.
    if (fmt in BRANCHES and fmt in branches) or (fmt == "auto" and branches):
        if fmt == "auto":
            if len(branches) > 1:
                raise ConversionError(
                    f"ambiguous layout: tensors under {', '.join(BRANCHES[b][0] for b in branches)}"
                    " (several encoders of different methods); pass --format to choose"
                )
            fmt = branches[0]
        kept, dropped, branch = _take_branch(state, fmt)
        if hint == "dino":
            branch = "teacher " + branch + " (DINO's evaluation default; the student is ignored)"
        return Recognised(fmt, container, branch, kept, dropped, arch)

    # No branch prefix: a backbone-only file (torchvision, released DINO / MAE / MoCo v3 files).
    if resnet.is_torchvision_resnet(state):
        if fmt not in ("auto", "torchvision", "dino", "mocov3", "moco", "simsiam"):
            raise ConversionError(f"--format {fmt}: this is a torchvision-style ResNet state dict")
        has_fc = any(k.startswith("fc.") for k in state)
        what = "torchvision ResNet state dict" + (
            "" if has_fc else " without fc (e.g. DINO's released R-50 backbone)"
        )
        return Recognised(
            fmt if fmt != "auto" else "torchvision",
            f"{what}, {container}",
            "all of it",
            state,
            [],
            arch,
        )
    if vit.is_timm_vit(state):
        if fmt == "auto":
            fmt, what = _vit_format(state, wrapped)
        elif fmt in ("dino", "mae", "mocov3"):
            what = f"ViT backbone file read as {fmt}"
        else:
            raise ConversionError(f"--format {fmt}: this is a ViT, not a {fmt} checkpoint")
        return Recognised(fmt, f"{what}, {container}", "the encoder", state, [], arch)
    sample = ", ".join(list(state)[:6])
    raise ConversionError(
        f"no backbone found in this {container}: neither a ResNet nor a ViT nor a known SSL "
        f"wrapper (first keys: {sample})"
    )
