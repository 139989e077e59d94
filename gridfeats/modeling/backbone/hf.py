"""Hugging Face vision transformers as backbones: the model runs through ``transformers`` itself.

Why a wrapper and not a re-implementation: DINOv2, CLIP, SigLIP and friends each have their own
embedding details (register tokens, pre-norms, position interpolation) that ``transformers``
already gets right, and the features must equal the model's own ``last_hidden_state``. The wrapper
only turns tokens into a map: it pads the input to the patch size (bottom/right zeros, the mean
colour after normalisation), runs the model with position interpolation on (``interpolate_pos_
encoding=True`` where the model has the switch; DINOv2 always interpolates), drops the cls and
register tokens, and lays the patch tokens out as ``[N, D, ceil(H/p), ceil(W/p)]``.

ViTMAE masks a random 75 % of the patches and shuffles the rest in its own forward; the wrapper
builds it with ``mask_ratio=0`` and passes ``noise = arange(L)`` so the kept order is the image
order. The architecture comes from ``cfg.MODEL.HF.CONFIG`` (the folder's ``config.json``,
copied into the config by ``gridfeats convert-backbone``); the weights come from the checkpoint.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from gridfeats.layers import ShapeSpec
from gridfeats.modeling.backbone.backbone import Backbone
from gridfeats.modeling.backbone.build import BACKBONE_REGISTRY
from gridfeats.modeling.backbone.vit import VIT_OUT_FEATURE

#: Supported classes -> whether their forward takes ``interpolate_pos_encoding``.
HF_VISION_MODELS: Dict[str, bool] = {
    "ViTModel": True,
    "ViTMAEModel": True,
    "Dinov2Model": False,  # always interpolates
    "Dinov2WithRegistersModel": False,
    "CLIPVisionModel": True,
    "SiglipVisionModel": True,
}


def hf_model_class(name: str):
    """The ``transformers`` class of a supported model name (clear error otherwise)."""
    if name not in HF_VISION_MODELS:
        raise ValueError(
            f"Hugging Face model class {name!r} is not supported as a backbone "
            f"(supported: {', '.join(HF_VISION_MODELS)})"
        )
    import transformers

    return getattr(transformers, name)


def hf_model_kwargs(name: str) -> Dict[str, Any]:
    """Constructor / ``from_pretrained`` options that drop parts the backbone never uses."""
    return {"add_pooling_layer": False} if name == "ViTModel" else {}


def build_hf_config(name: str, config: Mapping[str, Any]):
    """A ``transformers`` config for ``name`` from a ``config.json`` dict (a full CLIP/SigLIP
    config gives its ``vision_config``); ViTMAE gets ``mask_ratio = 0``."""
    cls = hf_model_class(name)
    config = dict(config)
    if config.get("model_type") in ("clip", "siglip") and "vision_config" in config:
        config = dict(config["vision_config"])
    config.pop("architectures", None)
    hf_config = cls.config_class.from_dict(config)
    if name == "ViTMAEModel":
        hf_config.mask_ratio = 0.0
    return hf_config


def num_prefix_tokens(name: str, hf_config) -> int:
    """Tokens before the patches in ``last_hidden_state``: cls (+ registers); SigLIP: none."""
    if name == "SiglipVisionModel":
        return 0
    return 1 + int(getattr(hf_config, "num_register_tokens", 0) or 0)


class HFVisionBackbone(Backbone):
    """A ``transformers`` vision model whose patch tokens form a stride-``patch_size`` map."""

    def __init__(
        self, model_class: str, config: Mapping[str, Any], out_feature: str = VIT_OUT_FEATURE
    ):
        super().__init__()
        self.model_class = model_class
        self.hf_config = build_hf_config(model_class, config)
        self.model = hf_model_class(model_class)(self.hf_config, **hf_model_kwargs(model_class))
        self.patch_size = int(self.hf_config.patch_size)
        self.embed_dim = int(self.hf_config.hidden_size)
        self.prefix_tokens = num_prefix_tokens(model_class, self.hf_config)
        self.out_feature = out_feature

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {self.out_feature: ShapeSpec(channels=self.embed_dim, stride=self.patch_size)}

    def last_hidden_state(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own ``last_hidden_state`` for ``x`` padded to the patch size."""
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        kwargs: Dict[str, Any] = {}
        if HF_VISION_MODELS[self.model_class]:
            kwargs["interpolate_pos_encoding"] = True
        if self.model_class == "ViTMAEModel":
            length = (x.shape[-2] // p) * (x.shape[-1] // p)
            kwargs["noise"] = torch.arange(length, device=x.device, dtype=torch.float32).expand(
                x.shape[0], -1
            )
        return self.model(pixel_values=x, **kwargs).last_hidden_state

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        gh, gw = -(-x.shape[-2] // self.patch_size), -(-x.shape[-1] // self.patch_size)
        tokens = self.last_hidden_state(x)[:, self.prefix_tokens :]
        if tokens.shape[1] != gh * gw:
            raise RuntimeError(
                f"{self.model_class} returned {tokens.shape[1]} patch tokens for a {gh}x{gw} grid"
            )
        return {self.out_feature: tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)}

    def grid_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward(x)


def plain_config(node: Mapping[str, Any]) -> Dict[str, Any]:
    """A config node (``cfg.MODEL.HF.CONFIG``) as plain nested dicts and lists."""
    return json.loads(json.dumps(node))


@BACKBONE_REGISTRY.register()
def build_hf_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> HFVisionBackbone:
    """Build from ``cfg.MODEL.HF.MODEL_CLASS`` and ``cfg.MODEL.HF.CONFIG`` (random init)."""
    h = cfg.MODEL.HF
    if not h.CONFIG:
        raise ValueError(
            "MODEL.HF.CONFIG is empty: write the config with `gridfeats convert-backbone "
            "HF_FOLDER --out DST.pth`, which copies the folder's config.json into it"
        )
    return HFVisionBackbone(h.MODEL_CLASS, plain_config(h.CONFIG))
