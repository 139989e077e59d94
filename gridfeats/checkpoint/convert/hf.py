"""Local Hugging Face folders (``config.json`` + weights + ``preprocessor_config.json``).

The weights are read by ``transformers`` itself (``from_pretrained``: safetensors, or ``.bin``
through ``torch.load(weights_only=True)``), into the same class the backbone wrapper builds, so
the tensors keep ``transformers``' names under ``backbone.model.``. A full ``CLIPModel`` or
``SiglipModel`` folder gives its vision tower (``vision_config`` and the ``vision_model.*``
tensors). The pixel mean/std come from the folder's image processor, in 0..255 units.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from gridfeats.checkpoint.convert.errors import ConversionError

#: ``config.json``'s ``model_type`` -> the backbone wrapper's model class.
MODEL_CLASS_OF_TYPE = {
    "vit": "ViTModel",
    "vit_mae": "ViTMAEModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


#: config.json entries that do not describe the vision model (labels, provenance).
_NOT_ARCHITECTURE = (
    "architectures",
    "_name_or_path",
    "transformers_version",
    "id2label",
    "label2id",
)


@dataclass
class HFSource:
    model_class: str
    config: Dict[str, Any]  # the vision model's config.json dict
    state: "OrderedDict[str, torch.Tensor]"  # wrapper names: "model." + transformers' names
    pixel_mean: List[float]
    pixel_std: List[float]
    layout: str


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _pixel_stats(folder: Path) -> tuple:
    """Mean/std the model was trained on, in the 0..255 units of ``MODEL.PIXEL_MEAN``."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise ConversionError(
            f"{folder}: no preprocessor_config.json, so the image mean/std the model expects are "
            "unknown; save its image processor into the folder (processor.save_pretrained)"
        )
    proc = json.loads(path.read_text())
    rescale = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
    if proc.get("do_normalize", True):
        mean, std = proc.get("image_mean"), proc.get("image_std")
        if mean is None or std is None:
            raise ConversionError(f"{path}: do_normalize without image_mean / image_std")
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    if isinstance(std, (int, float)):
        std = [std] * 3
    return [round(float(m) / rescale, 6) for m in mean], [round(float(s) / rescale, 6) for s in std]


def read_hf_folder(folder: Path) -> HFSource:
    from gridfeats.modeling.backbone.hf import build_hf_config, hf_model_class, hf_model_kwargs

    raw = json.loads((folder / "config.json").read_text())
    model_type = raw.get("model_type")
    name = MODEL_CLASS_OF_TYPE.get(model_type)
    if name is None:
        raise ConversionError(
            f"{folder}: Hugging Face model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(MODEL_CLASS_OF_TYPE))})"
        )
    hf_config = build_hf_config(name, raw)
    cls = hf_model_class(name)
    try:
        model, info = cls.from_pretrained(
            folder,
            config=hf_config,
            output_loading_info=True,
            dtype=torch.float32,
            **hf_model_kwargs(name),
        )
    except (OSError, ValueError) as e:
        raise ConversionError(f"{folder}: transformers could not load the weights: {e}") from None
    problems = list(info.get("missing_keys", [])) + [
        str(m) for m in info.get("mismatched_keys", [])
    ]
    if problems:
        raise ConversionError(
            f"{folder}: the weights do not fill {name}: {', '.join(problems[:8])}"
            + (f" ... ({len(problems)} in all)" if len(problems) > 8 else "")
        )
    vision = dict(raw["vision_config"]) if "vision_config" in raw else dict(raw)
    vision.setdefault("model_type", hf_config.model_type)
    for key in _NOT_ARCHITECTURE:
        vision.pop(key, None)
    state = OrderedDict(("model." + k, v.detach().clone()) for k, v in model.state_dict().items())
    mean, std = _pixel_stats(folder)
    arch = (raw.get("architectures") or [name])[0]
    tower = " (its vision tower)" if "vision_config" in raw else ""
    layout = f"Hugging Face folder: {arch}, model_type {model_type!r}{tower}, run as {name}"
    return HFSource(name, vision, state, mean, std, layout)
