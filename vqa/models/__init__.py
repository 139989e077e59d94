"""VQA and captioning heads on stored feature rows.

All heads take the same image input: ``feats [B, N, D]``, ``feat_mask [B, N]`` (True for real rows)
and ``boxes [B, N, 4]`` (normalised row boxes, see ``vqa.models.inputs``). Builders turn the
``model:`` section of a YAML config into a module and reject unknown keys with a clear message.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import numpy as np
from torch import nn

from vqa.models.mcan import MCAN, MCAN_SIZES
from vqa.models.pythia import Pythia
from vqa.models.updown import UpDownCaptioner

VQA_MODELS = {"pythia": Pythia, "mcan": MCAN}

__all__ = [
    "MCAN",
    "MCAN_SIZES",
    "Pythia",
    "UpDownCaptioner",
    "VQA_MODELS",
    "build_vqa_model",
    "build_captioner",
]


def _options(model_cfg: Mapping[str, Any], cls: type, reserved: set) -> dict:
    options = {k: v for k, v in model_cfg.items() if k != "name"}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"} - reserved
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"unknown option(s) for model {cls.__name__}: {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    return options


def build_vqa_model(
    model_cfg: Mapping[str, Any],
    vocab_size: int,
    num_answers: int,
    feature_dim: int,
    word_vectors: Optional[np.ndarray] = None,
) -> nn.Module:
    """``model_cfg`` is e.g. ``{"name": "mcan", "size": "small", "layers": 6}``."""
    name = model_cfg.get("name")
    if name not in VQA_MODELS:
        raise ValueError(f"unknown VQA model {name!r}; choose one of {sorted(VQA_MODELS)}")
    cls = VQA_MODELS[name]
    reserved = {"vocab_size", "num_answers", "feature_dim", "word_vectors"}
    options = _options(model_cfg, cls, reserved)
    return cls(
        vocab_size=vocab_size,
        num_answers=num_answers,
        feature_dim=feature_dim,
        word_vectors=word_vectors,
        **options,
    )


def build_captioner(
    model_cfg: Mapping[str, Any], vocab_size: int, feature_dim: int, bos_id: int, eos_id: int
) -> UpDownCaptioner:
    """``model_cfg`` is e.g. ``{"name": "updown", "hidden": 1000}``."""
    name = model_cfg.get("name", "updown")
    if name != "updown":
        raise ValueError(f"unknown captioning model {name!r}; the only one is 'updown'")
    reserved = {"vocab_size", "feature_dim", "bos_id", "eos_id"}
    options = _options(model_cfg, UpDownCaptioner, reserved)
    return UpDownCaptioner(
        vocab_size=vocab_size, feature_dim=feature_dim, bos_id=bos_id, eos_id=eos_id, **options
    )
