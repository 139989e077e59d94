"""Optimizer parameter groups: separate weight decay for norm layers and biases, LR multipliers.

The rules follow Detectron2's ``get_default_optimizer_params``: parameters are visited module by
module in ``model.modules()`` order (each shared parameter once, frozen ones left out), a norm
layer's parameters take ``weight_decay_norm``, a parameter named ``bias`` takes
``weight_decay_bias`` and ``lr * bias_lr_factor``, and parameters with equal settings are then
merged into one group, groups in order of first appearance. ``None`` for a norm/bias setting means
"same as the others". With the defaults the result is a single group holding exactly
``model.parameters()`` (trainable ones), so an optimizer built on it equals one built on the bare
parameter list.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

#: Module types whose parameters count as normalisation parameters.
NORM_MODULE_TYPES: Tuple[type, ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _lr_multiplier(name: str, multipliers: Mapping[str, float]) -> float:
    """The multiplier of the longest prefix of ``name`` in ``multipliers`` (1.0 if none)."""
    best, factor = -1, 1.0
    for prefix, value in multipliers.items():
        if name.startswith(prefix) and len(prefix) > best:
            best, factor = len(prefix), float(value)
    return factor


def build_param_groups(
    model: nn.Module,
    *,
    lr: Optional[float] = None,
    weight_decay: float = 0.0,
    weight_decay_norm: Optional[float] = None,
    weight_decay_bias: Optional[float] = None,
    bias_lr_factor: float = 1.0,
    lr_multipliers: Optional[Mapping[str, float]] = None,
    norm_module_types: Tuple[type, ...] = NORM_MODULE_TYPES,
) -> List[Dict[str, Any]]:
    """Parameter groups for ``torch.optim`` constructors (see the module docstring).

    ``lr_multipliers`` maps parameter-name prefixes (``"backbone."``) to LR factors; LR settings
    need a base ``lr``. Without any LR setting the groups carry no ``lr`` and the optimizer's
    own ``lr`` applies.
    """
    multipliers = dict(lr_multipliers or {})
    if lr is None and (multipliers or bias_lr_factor != 1.0):
        raise ValueError("lr_multipliers and bias_lr_factor need a base lr")
    seen = set()
    groups: Dict[Tuple[Tuple[str, float], ...], Dict[str, Any]] = {}
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, norm_module_types)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            settings: Dict[str, float] = {"weight_decay": float(weight_decay)}
            if lr is not None:
                settings["lr"] = float(lr) * _lr_multiplier(full_name, multipliers)
            if is_norm and weight_decay_norm is not None:
                settings["weight_decay"] = float(weight_decay_norm)
            if param_name == "bias":
                if weight_decay_bias is not None:
                    settings["weight_decay"] = float(weight_decay_bias)
                if lr is not None:
                    settings["lr"] *= float(bias_lr_factor)
            key = tuple(sorted(settings.items()))
            group = groups.setdefault(key, {"params": [], **settings})
            group["params"].append(param)
    return list(groups.values())
