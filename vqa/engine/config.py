"""The heads' YAML config: defaults, ``_BASE_`` inheritance, ``KEY VALUE``/``key=value`` overrides.

Files are read by the project's one config reader (``gridfeats.config.load_yaml_with_base``, the
detector's): ``_BASE_: other.yaml`` (or a list, relative to the including file) inherits and
overrides another file, which is how mcan-small and mcan-large share their training recipe; errors
are ``gridfeats.config.ConfigError``. Overrides come as Detectron2's ``KEY VALUE`` pairs
(``train.epochs 3``) or as ``key=value`` words (``train.epochs=3``), mixed freely; values are
parsed as YAML.

The schema stays plain nested dicts with lower-case keys rather than a CfgNode: the heads have a
few dozen settings, read as ``cfg["train"]["epochs"]`` and stored in checkpoints as a dict, and a
typo must fail loudly. Every section except ``model`` (validated by the model builder against the
constructor's arguments) is checked against the defaults, so an unknown key is an error naming
the key and the accepted ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

from gridfeats.config import ConfigError, load_yaml_with_base
from gridfeats.config.yaml_loader import BASE_KEY

LEGACY_BASE_KEY = "_base_"

FREE_FORM_SECTIONS = ("model",)

COMMON_DEFAULTS: Dict[str, Any] = {
    "model": {},
    "optim": {
        "name": "adam",  # adam | adamw | adamax | sgd
        "lr": 1e-4,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.9,  # sgd only
        "grad_clip": 0.0,  # the clipping threshold; 0 disables
        "grad_clip_type": "full_model",  # full_model (global norm) | norm (per parameter) | value
        "weight_decay_norm": None,  # null: weight_decay (norm-layer parameters)
        "weight_decay_bias": None,  # null: weight_decay (biases)
    },
    "schedule": {
        "unit": "epoch",  # unit of warmup and milestones: epoch | step
        "warmup": 0,
        "warmup_method": "none",  # none | staircase (MCAN) | linear (Pythia)
        "warmup_factor": 0.2,  # linear warm-up's starting multiplier
        "milestones": [],
        "gamma": 0.1,
    },
    "train": {
        "epochs": 1,
        "batch_size": 64,
        "eval_batch_size": 128,
        "seed": 0,
        "num_workers": 0,
        "device": "auto",  # auto | cpu | cuda
        "precision": "fp32",  # fp32 | bf16 (GPU, or CPU with native bf16) | fp16 (GPU)
        "grad_accumulation": 1,  # batches per optimizer step (global batch: x batch_size x ranks)
        "deterministic": False,
        "checkpoint_every_steps": 0,  # mid-epoch checkpoints; 0: only at epoch ends
        "log_every_steps": 20,
        "eval_every_epochs": 1,
        "tensorboard": False,
        "progress": True,
    },
}


def _merge(
    base: Dict[str, Any], update: Mapping[str, Any], defaults: Mapping[str, Any], where: str
) -> Dict[str, Any]:
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        free_form = where.split(".")[0] in FREE_FORM_SECTIONS if where else False
        if not free_form and key not in defaults:
            accepted = ", ".join(sorted(map(str, defaults))) or "(none)"
            raise ConfigError(f"unknown config key {path!r}; accepted here: {accepted}")
        default = defaults.get(key) if not free_form else None
        if isinstance(value, Mapping) and (
            isinstance(default, Mapping) or key in FREE_FORM_SECTIONS or free_form
        ):
            base[key] = _merge(dict(base.get(key) or {}), value, default or {}, path)
        elif isinstance(default, Mapping):
            raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
        else:
            base[key] = value
    return base


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = load_yaml_with_base(path)
    if LEGACY_BASE_KEY in data:
        raise ConfigError(
            f"{path} (or a file it includes) uses {LEGACY_BASE_KEY!r}; the inheritance key is "
            f"{BASE_KEY!r}, as in the detector configs"
        )
    return data


def _deep_update(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_update(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _nested(text: str, dotted: str, value: Any) -> Dict[str, Any]:
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    for key in reversed(keys):
        value = {key: value}
    return value


def _yaml_value(text: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None


def parse_override(text: str) -> Dict[str, Any]:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    return _nested(text, dotted, _yaml_value(text, raw))


def parse_overrides(opts: Sequence[str]) -> List[Dict[str, Any]]:
    """``KEY VALUE`` pairs and ``key=value`` words, in order, as nested dicts.

    A word with ``=`` is one override; any other word is a key whose value is the next word.
    """
    out: List[Dict[str, Any]] = []
    index = 0
    while index < len(opts):
        word = opts[index]
        if "=" in word:
            out.append(parse_override(word))
            index += 1
            continue
        if index + 1 >= len(opts):
            raise ConfigError(
                f"override {word!r} must look like section.key=value or be followed by its value"
            )
        out.append(_nested(word, word, _yaml_value(word, opts[index + 1])))
        index += 2
    return out


def load_config(
    path: Optional[Union[str, Path]], defaults: Mapping[str, Any], overrides: Sequence[str] = ()
) -> Dict[str, Any]:
    """Defaults, then the file (with its ``_BASE_`` chain), then the overrides."""
    config = copy.deepcopy(dict(defaults))
    if path is not None:
        config = _merge(config, _read_yaml(Path(path)), defaults, "")
    for update in parse_overrides(list(overrides)):
        config = _merge(config, update, defaults, "")
    return config


def with_task_defaults(task_defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """The common defaults plus a task's own sections (``data``, ``loss``, ``decode`` ...)."""
    return _deep_update(COMMON_DEFAULTS, task_defaults)
