"""Self-supervised pretraining: SimSiam, MoCo v2 / v3, MAE and DINO as their reference repos run it.

``build_method(name, checkpoint=..., **hparams)`` returns a :class:`PretrainMethod` whose
``train_step(views)`` is one iteration of the repo's training loop and whose
``upstream_state_dict()`` is the repo's own training-checkpoint layout (and ``checkpoint=`` reads it
back). The CLI (``gridfeats pretrain``) loops over it; see ``docs/pretrain.md``.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Type

from gridfeats.pretrain.base import PretrainError, PretrainMethod

#: hyper-parameter keywords every method accepts by name (those a method does not use are ignored
#: with a warning, so one call site can drive all methods)
COMMON_HPARAMS = (
    "lr",
    "weight_decay",
    "momentum",
    "ema",
    "temperature",
    "teacher_temp",
    "student_temp",
    "center_momentum",
    "mask_ratio",
    "norm_pix_loss",
    "queue_size",
    "num_heads",
    "predictor_fixed_lr",
    "optimizer",
)


def method_classes() -> Dict[str, Type[PretrainMethod]]:
    from gridfeats.pretrain.dino import DINO
    from gridfeats.pretrain.mae import MAE
    from gridfeats.pretrain.mocov2 import MoCoV2
    from gridfeats.pretrain.mocov3 import MoCoV3
    from gridfeats.pretrain.simsiam import SimSiam

    return {c.name: c for c in (SimSiam, MoCoV2, MoCoV3, MAE, DINO)}


METHODS = ("simsiam", "mocov2", "mocov3", "mae", "dino")


def build_method(
    name: str, checkpoint: Optional[Any] = None, arch: Optional[str] = None, **hparams: Any
) -> PretrainMethod:
    """A pretraining method by name, optionally continued from a checkpoint in its repo's layout.

    ``checkpoint`` is a path or a loaded dict (``{"state_dict"}`` for SimSiam / MoCo v2 / v3,
    ``{"model"}`` for MAE, ``{"student", "teacher", "dino_loss"}`` for DINO); the network sizes
    are then read from its shapes (``num_heads`` cannot be, pass it for ViTs that differ from the
    repo's default). Keywords left ``None`` take the repo's default.
    """
    import inspect

    classes = method_classes()
    if name not in classes:
        raise PretrainError(f"unknown pretraining method {name!r}; known: {', '.join(METHODS)}")
    cls = classes[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {}
    for key, value in hparams.items():
        if value is None:
            continue
        if key not in accepted:
            if key in COMMON_HPARAMS:
                warnings.warn(f"{name} does not use {key}={value!r}; ignored", stacklevel=2)
                continue
            raise PretrainError(
                f"{name} has no hyper-parameter {key!r}; it takes {', '.join(sorted(accepted))}"
            )
        kwargs[key] = value
    if arch is not None:
        kwargs["arch"] = arch
    return cls(checkpoint=checkpoint, **kwargs)


__all__ = ["METHODS", "PretrainError", "PretrainMethod", "build_method"]
