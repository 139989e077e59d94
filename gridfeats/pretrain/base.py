"""What every pretraining method offers the loop, the tests and the checkpoint code.

A method owns its networks (laid out as the reference repo's model, so ``state_dict`` keys are the
repo's minus the DDP ``module.`` prefix), its optimizer and its own non-gradient state (momentum
encoder, queue, center). ``train_step`` is one iteration in the repo's order; the loop sets the
schedule position first with :meth:`PretrainMethod.set_progress`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from gridfeats.errors import GridfeatsError
from gridfeats.precision import autocast, check_precision
from gridfeats.pretrain.nets import backbone_features


class PretrainError(GridfeatsError, ValueError):
    """A pretraining request that cannot run (the message says why)."""


def world() -> tuple:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 0 (no gradient); the tensor itself alone."""
    _, size = world()
    if size == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def strip_module(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop the DDP ``module.`` prefix where every key has it (files saved without DDP lack it)."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def add_module(state: Mapping[str, Any]) -> Dict[str, Any]:
    return {"module." + k: v for k, v in state.items()}


def load_file(path: str) -> Any:
    """Read a (trusted) training checkpoint; MAE and DINO store an ``argparse.Namespace``."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise PretrainError(f"checkpoint not found: {path}") from e


def read_obj(checkpoint: Optional[Any]) -> Optional[Mapping[str, Any]]:
    """A checkpoint given as a path or as the loaded dict; None stays None."""
    if checkpoint is None:
        return None
    obj = (
        load_file(checkpoint)
        if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__")
        else checkpoint
    )
    if not isinstance(obj, Mapping):
        raise PretrainError(f"a pretraining checkpoint must be a dict, got {type(obj).__name__}")
    return obj


def optimizer_kind(obj: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Which optimizer wrote a checkpoint's state: "lars" (``mu``), "adamw" (``exp_avg``), "sgd"
    (``momentum_buffer``); None when it holds no per-parameter state."""
    state = ((obj or {}).get("optimizer") or {}).get("state") or {}
    for entry in state.values():
        if "mu" in entry:
            return "lars"
        if "exp_avg" in entry:
            return "adamw"
        if "momentum_buffer" in entry:
            return "sgd"
    return None


def cosine(base: float, final: float, progress: float) -> float:
    """Half-cosine from ``base`` (progress 0) to ``final`` (progress 1)."""
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load every tensor, failing with the first differing keys (a silent partial load trains
    from scratch without saying so)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise PretrainError(
            f"{what}: checkpoint keys do not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise PretrainError(
                f"{what}: {k} has shape {tuple(v.shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the model"
            )
    module.load_state_dict(state, strict=True)


class PretrainMethod(nn.Module):
    """Base class: subclasses define the networks, ``_step`` and the upstream layout."""

    #: name used by ``build_method`` and the CLI
    name = ""
    #: hyper-parameters the method reads (keyword names of ``build_method``)
    hparams: Sequence[str] = ()

    def __init__(self, arch: str, precision: str = "fp32", device: str = "cpu"):
        super().__init__()
        self.arch = arch
        self.precision = precision
        self.epoch = 0  # integer epoch: DINO's teacher temperature and last-layer freezing read it
        self.epochs = 100
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self._device = torch.device(device)
        check_precision(precision, self._device)

    # ----------------------------------------------------------------- pieces for the subclasses
    def _finish(self, checkpoint: Optional[Any]) -> None:
        """Move to the device, build the optimizer, then load a checkpoint (weights, optimizer)."""
        self.to(self._device)
        self.optimizer = self.build_optimizer()
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self._device.type)
        obj = read_obj(checkpoint)
        if obj is not None:
            self.load_upstream(obj)
        self.apply_hparams()

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return autocast(self.precision, self._device)

    def _sync_grads(self) -> None:
        """Average gradients over ranks (what DDP's reducer does), right after backward so that
        gradient edits (DINO's clipping) see the global gradient as in the repos' DDP runs."""
        _, size = world()
        if size == 1:
            return
        for p in self.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(size)

    def backward_and_step(self, loss: torch.Tensor, before_step=None) -> None:
        """zero_grad, backward (scaled in fp16), optional gradient edit, optimizer step."""
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self._sync_grads()
            if before_step is not None:
                self.scaler.unscale_(self.optimizer)
                before_step()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._sync_grads()
            if before_step is not None:
                before_step()
            self.optimizer.step()

    def load_optimizer_state(self, state: Optional[Mapping[str, Any]]) -> None:
        """Load the repo's optimizer state when it fits this optimizer's parameter groups."""
        if not state:
            return
        groups = state.get("param_groups", [])
        ours = self.optimizer.param_groups
        if len(groups) != len(ours) or any(
            len(g["params"]) != len(o["params"]) for g, o in zip(groups, ours)
        ):
            raise PretrainError(
                "the checkpoint's optimizer state has other parameter groups than this method's "
                f"optimizer ({[len(g['params']) for g in groups]} vs "
                f"{[len(o['params']) for o in ours]} parameters)"
            )
        self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------------- subclass interface
    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def apply_hparams(self) -> None:
        """Write the current lr / weight decay / momentum into the optimizer's groups."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
            group["weight_decay"] = self.weight_decay

    def set_progress(self, epoch: float, epochs: int, iters_per_epoch: int = 0) -> None:
        """Put the schedules (lr, momentum, temperature, ...) at fractional epoch ``epoch`` of
        ``epochs`` (``iters_per_epoch`` for schedules the repo tabulates per iteration: DINO)."""
        self.epoch = int(epoch)
        self.epochs = epochs

    def train_step(self, views: List[torch.Tensor], **kwargs) -> float:
        """One iteration: forward, backward, optimizer step, the method's own updates; the loss."""
        self.train()
        views = [v.to(self._device, non_blocking=True) for v in views]
        return float(self._step(views, **kwargs))

    def _step(self, views: List[torch.Tensor], **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def upstream_state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_upstream(self, obj: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def backbone(self) -> nn.Module:
        """The network whose weights are the pretrained backbone (exported, kNN-evaluated)."""
        raise NotImplementedError

    def monitor_output(self, x: torch.Tensor) -> torch.Tensor:
        """The output whose l2-normalised std is the collapse monitor (SimSiam: projector z)."""
        raise NotImplementedError

    def num_views(self) -> int:
        return 2


class EncoderCheckpointMethod(PretrainMethod):
    """A method whose repo saves ``{"epoch", "arch", "state_dict" (``module.`` keys),
    "optimizer"}`` and whose backbone is one ResNet attribute of ``self.model``: SimSiam
    (``encoder``) and MoCo v1/v2 (``encoder_q``). ``encoder_name`` names that attribute."""

    encoder_name = ""

    def upstream_state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "arch": self.arch,
            "state_dict": add_module(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_upstream(self, obj: Mapping[str, Any]) -> None:
        load_strict(self.model, strip_module(obj["state_dict"]), f"{self.name} state_dict")
        self.load_optimizer_state(obj.get("optimizer"))

    def backbone(self) -> nn.Module:
        return getattr(self.model, self.encoder_name)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.backbone(), x)

    def monitor_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone()(x)
