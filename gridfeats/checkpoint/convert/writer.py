"""Turn a recognised backbone into ``DST.pth`` + ``DST.yaml`` and check that they fit together.

Why the check: the classic SSL-transfer failure is a run whose backbone silently stayed at its
random init (keys that matched nothing). Before anything is written in place, the written config's
model is built and the written checkpoint loaded into it; every backbone tensor must be filled,
nothing may be left over, and every shape must fit, or the conversion fails naming the tensors.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from gridfeats.checkpoint.convert import hf, resnet, vit
from gridfeats.checkpoint.convert.errors import ConversionError
from gridfeats.checkpoint.convert.layouts import FORMATS, Recognised, recognise
from gridfeats.checkpoint.loader import BACKBONE_PREFIXES, _torch_load, load_state, read_checkpoint

DEFAULT_BASE = "R-50-grid"
AUTHOR = "gridfeats convert-backbone"

#: The one feature map of the ViT / HF backbones, read by the RPN and the grid config's box head.
_SINGLE_MAP_HEADS = {
    "MODEL.RPN.IN_FEATURES": ["last_feat"],
    "MODEL.ROI_HEADS.IN_FEATURES": ["last_feat"],
}
_IMAGENET_RGB = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": resnet.IMAGENET_PIXEL_MEAN,
    "MODEL.PIXEL_STD": resnet.IMAGENET_PIXEL_STD,
}


@dataclass
class Conversion:
    """What ``convert_backbone`` found, did and wrote."""

    source: str
    format: str
    layout: str
    branch: str
    architecture: str
    config: Dict[str, Any]  # the keys set on top of the base config
    weights: Path
    config_file: Path
    num_tensors: int
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"source: {self.source}",
            f"layout: {self.layout} -> format {self.format}",
            f"branch: {self.branch}",
        ]
        if self.dropped:
            lines.append(f"dropped: {len(self.dropped)} tensors ({_group(self.dropped)})")
        lines.append(f"architecture: {self.architecture}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(
            "config on top of the base: "
            + ", ".join(f"{k}={_short(v)}" for k, v in self.config.items())
        )
        lines.append(f"wrote {self.weights} ({self.num_tensors} backbone tensors)")
        lines.append(f"wrote {self.config_file}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _group(keys: Sequence[str]) -> str:
    """``encoder_k.* (320), queue (1)``: dropped keys grouped by their first name part."""
    counts: "OrderedDict[str, int]" = OrderedDict()
    for key in keys:
        head = "*.num_batches_tracked" if key.endswith("num_batches_tracked") else key.split(".")[0]
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(
        f"{k}{'.*' if n > 1 and '*' not in k else ''} ({n})" for k, n in counts.items()
    )


# -------------------------------------------------------------------------------------------------
# Source -> project names + config
# -------------------------------------------------------------------------------------------------
def _from_checkpoint(rec: Recognised, num_heads: Optional[int]) -> tuple:
    """``(state under backbone names, config, architecture, dropped, notes)`` of a source."""
    state, dropped, notes = rec.state, list(rec.dropped), []
    recorded = dict(rec.recorded_config)
    if resnet.is_torchvision_resnet(state):
        state, more = resnet.torchvision_to_project(state)
        dropped += more
        config = {**resnet.resnet_config(state), **resnet.TORCHVISION_INPUT_CONFIG}
        arch = resnet.describe_resnet(config) + ", torchvision layout (stride in the 3x3)"
    elif resnet.is_project_resnet(state):
        state, more = resnet.project_resnet_drop(state)
        dropped += more
        config = resnet.resnet_config(state)
        arch = resnet.describe_resnet(config) + ", project (Detectron2) names"
        if rec.format == "gridfeats-pretrain":
            config["MODEL.RESNETS.NORM"] = "FrozenBN"  # BN in training; frozen statistics now
            if recorded.pop("MODEL.RESNETS.NORM", "FrozenBN") != "FrozenBN":
                notes.append("the recorded RESNETS.NORM becomes FrozenBN (same eval-mode output)")
            if not any(
                k.startswith(("INPUT.", "MODEL.PIXEL_", "MODEL.RESNETS.STRIDE")) for k in recorded
            ):
                notes.append("the checkpoint records no input settings: --base's are kept")
        else:
            notes.append("Detectron2 files do not record their input format: --base's is kept")
    elif vit.is_timm_vit(state):
        state, more = vit.split_vit(state)
        dropped += more
        recorded_heads = recorded.pop("MODEL.VIT.NUM_HEADS", None)
        heads, origin = vit.resolve_num_heads(rec.format, rec.arch, num_heads, recorded_heads)
        interp = recorded.pop("MODEL.VIT.POS_INTERP", None) or vit.POS_INTERP_OF_FORMAT.get(
            rec.format, "bicubic"
        )
        config = {**vit.vit_config(state, heads, interp), **_SINGLE_MAP_HEADS, **_IMAGENET_RGB}
        arch = vit.describe_vit(config) + f" (heads from {origin})"
        if rec.format != "gridfeats-pretrain":
            notes.append(
                f"LayerNorm eps {vit.VIT_LN_EPS:g}: the value of every {rec.format} ViT "
                "(the file does not store it)"
            )
    else:
        raise ConversionError("the recognised branch is neither a ResNet nor a ViT: no backbone")
    config.update(recorded)  # a pretraining checkpoint's own record wins over the defaults
    return state, config, arch, dropped, notes


def _set(cfg, key: str, value: Any) -> None:
    """Set an existing dotted key with the default's type (a dict becomes an open mapping node).

    Not ``merge_from_list``: that literal-evals strings, which would turn some values into others.
    """
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node:
            raise ConversionError(f"config key {key} does not exist")
        node = node[part]
    if parts[-1] not in node:
        raise ConversionError(f"config key {key} does not exist")
    old = node[parts[-1]]
    if isinstance(value, dict):
        node[parts[-1]] = type(cfg)(value, new_allowed=True)
        return
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(old, list) and isinstance(value, tuple):
        value = list(value)
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and type(old) is not type(value):
        raise ConversionError(f"config {key}: {value!r} is not a {type(old).__name__}")
    node[parts[-1]] = value


def _meta_model(cfg) -> torch.nn.Module:
    """The model ``cfg`` builds, on the meta device (names and shapes, no memory, no init time)."""
    from gridfeats.modeling import build_model

    try:
        with torch.device("meta"):
            return build_model(cfg)
    except (NotImplementedError, RuntimeError):  # a builder that reads tensor values at init
        with torch.random.fork_rng(devices=[]):
            return build_model(cfg)


def _place(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]):
    """Backbone names -> model names (``backbone.``; a C4 box head owns ``res5``); checks shapes."""
    placed: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    homeless, mismatched = [], []
    for key, value in state.items():
        target = next(
            (
                p + key
                for p in BACKBONE_PREFIXES
                if p + key in model_state and (p == "backbone." or key.startswith("res5."))
            ),
            None,
        )
        if target is None:
            homeless.append(key)
            continue
        want = tuple(model_state[target].shape)
        if tuple(value.shape) != want:
            mismatched.append(f"{key}: checkpoint {list(value.shape)} vs model {list(want)}")
            continue
        placed[target] = (
            value.detach()
            .to(torch.float32 if value.is_floating_point() else value.dtype)
            .contiguous()
        )
    if mismatched:
        raise ConversionError(
            "shape mismatch with the config's backbone:\n  " + "\n  ".join(mismatched[:20])
        )
    if homeless:
        raise ConversionError(
            "tensors the config's backbone has no place for: "
            + ", ".join(homeless[:12])
            + (f" ... ({len(homeless)} in all)" if len(homeless) > 12 else "")
        )
    missing = [k for k in model_state if k.startswith(BACKBONE_PREFIXES) and k not in placed]
    if missing:
        raise ConversionError(
            "the checkpoint does not fill the config's backbone: missing "
            + ", ".join(missing[:12])
            + (f" ... ({len(missing)} in all)" if len(missing) > 12 else "")
        )
    return placed


def _header(result: Conversion) -> str:
    lines = [f"Written by `{AUTHOR}`: backbone and input settings for {result.weights.name}."]
    lines += result.summary().splitlines()[:-2]
    return "".join(f"# {line}\n" for line in lines)


def convert_backbone(
    source: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    fmt: str = "auto",
    num_heads: Optional[int] = None,
    base: Union[str, os.PathLike] = DEFAULT_BASE,
) -> Conversion:
    """Convert ``source`` (a checkpoint file or a Hugging Face folder) into ``out`` (``.pth``) and
    ``out`` with ``.yaml``: backbone tensors under the project's names and a config on top of
    ``base`` that matches them. Raises :class:`ConversionError` with the reason when it cannot."""
    from gridfeats.config import get_cfg

    if fmt not in FORMATS:
        raise ConversionError(f"unknown --format {fmt!r} (one of {', '.join(FORMATS)})")
    src, out = Path(source), Path(out)
    if out.suffix != ".pth":
        raise ConversionError(f"--out must name a .pth file, got {out}")
    if not src.exists():
        raise ConversionError(f"source not found: {src}")
    notes: List[str] = []
    if hf.is_hf_folder(src) or fmt == "hf":
        if not hf.is_hf_folder(src):
            raise ConversionError(f"--format hf: {src} is not a folder with a config.json")
        h = hf.read_hf_folder(src)
        state = OrderedDict(h.state)
        config = {
            "MODEL.BACKBONE.NAME": "build_hf_backbone",
            "MODEL.HF.MODEL_CLASS": h.model_class,
            "MODEL.HF.CONFIG": h.config,
            **_SINGLE_MAP_HEADS,
            "INPUT.FORMAT": "RGB",
            "MODEL.PIXEL_MEAN": h.pixel_mean,
            "MODEL.PIXEL_STD": h.pixel_std,
        }
        rec_format, layout, branch, dropped = "hf", h.layout, "the vision model", []
        arch = f"{h.model_class} (patch tokens of last_hidden_state, through transformers)"
    elif src.is_dir():
        raise ConversionError(f"{src} is a folder without config.json: not a Hugging Face model")
    else:
        if src.suffix == ".pkl":
            if fmt not in ("auto", "detectron2"):
                raise ConversionError(f"--format {fmt}: a .pkl file is a Detectron2/Caffe2 file")
            state0, _, extra = read_checkpoint(src)
            obj: Any = {"model": state0, **{k: v for k, v in extra.items() if k != "model"}}
            rec = recognise(state0, "detectron2")
        else:
            obj = _torch_load(src)
            rec = recognise(obj, fmt)
        state, config, arch, dropped, notes = _from_checkpoint(rec, num_heads)
        rec_format, layout, branch = rec.format, rec.layout, rec.branch
        if num_heads is not None and "MODEL.VIT.NUM_HEADS" not in config:
            raise ConversionError("--num-heads applies to ViTs only; this backbone is a ResNet")

    cfg = get_cfg(base, freeze=False)
    for key, value in config.items():
        _set(cfg, key, value)
    _set(cfg, "MODEL.WEIGHTS", str(out.resolve()))
    model_state = _meta_model(cfg).state_dict()
    placed = _place(state, model_state)

    result = Conversion(
        str(src),
        rec_format,
        layout,
        branch,
        arch,
        config,
        out,
        out.with_suffix(".yaml"),
        len(placed),
        dropped,
        notes,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_pth, tmp_yaml = out.with_name(out.name + ".tmp"), out.with_name(out.stem + ".yaml.tmp")
    torch.save(
        {
            "model": placed,
            "__author__": AUTHOR,
            "source": str(src),
            "format": rec_format,
            "branch": branch,
        },
        tmp_pth,
    )
    tmp_yaml.write_text(_header(result) + cfg.dump())
    _verify(tmp_yaml, tmp_pth, config)
    os.replace(tmp_pth, out)
    os.replace(tmp_yaml, result.config_file)
    return result


def _verify(config_file: Path, weights: Path, config: Mapping[str, Any]) -> None:
    """The written config must read back as written, and its model must take every backbone
    tensor of the written checkpoint, by the loader every command uses (names and shapes; on the
    meta device)."""
    from gridfeats.config import get_cfg

    cfg = get_cfg(config_file)
    for key, value in config.items():
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        if json.loads(json.dumps(node)) != json.loads(json.dumps(value)):
            raise ConversionError(f"config {key} does not survive the YAML round trip: {value!r}")
    model = _meta_model(cfg)
    state, _, _ = read_checkpoint(weights)
    with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": intended
        warnings.simplefilter("ignore", UserWarning)
        report = load_state(model, state, str(weights))
    if report.unexpected or report.shape_mismatch or not report.backbone_complete:
        raise ConversionError(
            "the written checkpoint does not load into the written config:\n" + report.summary()
        )
