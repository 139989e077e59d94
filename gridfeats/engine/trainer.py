"""The project's one training loop: iterations of forward → loss dict → backward → step, with hooks.

Detectron2's ``SimpleTrainer``/``AMPTrainer`` shape, written here: the loop owns the optimizer
step (gradient accumulation, clipping, AMP, DDP) and the exact-resume bookkeeping; everything
periodic (checkpoints, evaluation, metrics, EMA) is a hook (``gridfeats.engine.hooks``). A model
(or a ``loss_fn``) returns a loss tensor or a dict of named losses; their sum is minimised.

Example (a model whose forward returns a loss dict, as Detectron2's meta-architectures do)::

    from gridfeats.engine import GradClip, Trainer, build_param_groups, hooks
    optimizer = torch.optim.SGD(build_param_groups(model, weight_decay=1e-4), lr=0.02)
    trainer = Trainer(model, data_loader, optimizer, scheduler, max_iter=1000,
                      clip_gradients=GradClip("norm", 1.0), precision="fp32")
    trainer.register_hooks([
        hooks.MetricsWriter("run/metrics.jsonl", period=20),
        hooks.EvalHook(evaluate, period=500),
        hooks.PeriodicCheckpointer("run", period=100),
    ])
    trainer.resume("run/last.pt")   # only when continuing a killed run
    trainer.train()

Counters. ``iter`` is the number of optimizer steps taken (Detectron2's ``iter + 1``), so a
checkpoint written after step 6 says ``iteration: 6`` and a resume starts step 7. One step
consumes ``grad_accumulation`` micro-batches from the data loader. The epoch view is derived from
the loader's length: ``iters_per_epoch = len(loader) // grad_accumulation``; ``epoch`` is the epoch
of the current step and ``batch_in_epoch`` the micro-batches taken from it. An unsized loader (an
infinite stream) has no epochs: it is iterated once, for ``max_iter`` steps.

Exact resume. A checkpoint stores the model, optimizer, scheduler, grad scaler, hook states, every
rank's random generators and the data position (epoch, micro-batch within it, and the state the
loader's ``generator`` had when that epoch started). On resume the epoch's iterator is rebuilt from
that state and advanced to the saved micro-batch: through the sampler when its ``set_epoch``
accepts ``skip_batches`` (``gridfeats.engine.ResumableBatchSampler``; no data is read), otherwise by
drawing and discarding batches. Only then are the saved generator states restored, so whatever
the skipped batches drew is already accounted for. For this to be exact, the data order must be a
function of (seed, epoch): a sampler with ``set_epoch``, or a ``DataLoader(..., generator=g)``.

Test hook: with ``GRIDFEATS_KILL_AT_STEP=N`` in the environment the process SIGKILLs itself after
the ``after_step`` hooks of step ``N`` (after any checkpoint of that step), which is how the tests
crash a run at an exact point.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer

from gridfeats import precision as precision_mod
from gridfeats.engine import distributed as comm
from gridfeats.engine.checkpoint import (
    TRAINING_STATE_FORMAT,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_atomic,
)

KILL_ENV = "GRIDFEATS_KILL_AT_STEP"

LossOutput = Union[torch.Tensor, Mapping[str, torch.Tensor]]
LossFn = Callable[[nn.Module, Any], LossOutput]

CLIP_TYPES = ("value", "norm", "full_model")


@dataclass(frozen=True)
class GradClip:
    """Gradient clipping, with Detectron2's ``SOLVER.CLIP_GRADIENTS`` meanings.

    ``value``: every gradient entry clamped to ``[-clip_value, clip_value]``. ``norm``: *each
    parameter's* gradient rescaled to norm ``clip_value`` (``norm_type``) if larger, which is what
    Detectron2's ``norm`` does (it clips parameter by parameter). ``full_model``: the global norm
    over all parameters (DETR's ``full_model``, and Pythia's ``grad_clip``).
    """

    clip_type: str = "full_model"
    clip_value: float = 1.0
    norm_type: float = 2.0

    def __post_init__(self) -> None:
        if self.clip_type not in CLIP_TYPES:
            raise ValueError(f"clip type must be one of {CLIP_TYPES}, got {self.clip_type!r}")
        if not self.clip_value > 0:
            raise ValueError(f"clip value must be positive, got {self.clip_value}")

    @classmethod
    def from_config(cls, node: Any) -> Optional["GradClip"]:
        """From a ``SOLVER.CLIP_GRADIENTS`` node (ENABLED, CLIP_TYPE, CLIP_VALUE, NORM_TYPE)."""
        if not node.ENABLED:
            return None
        return cls(str(node.CLIP_TYPE), float(node.CLIP_VALUE), float(node.NORM_TYPE))

    def __call__(self, parameters: Iterable[torch.Tensor]) -> None:
        params = [p for p in parameters if p.grad is not None]
        if self.clip_type == "full_model":
            nn.utils.clip_grad_norm_(params, self.clip_value, self.norm_type)
            return
        for p in params:
            if self.clip_type == "value":
                nn.utils.clip_grad_value_(p, self.clip_value)
            else:
                nn.utils.clip_grad_norm_(p, self.clip_value, self.norm_type)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested dicts/lists/tuples moved to ``device``; other values kept."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (state dicts without 'module.')."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _as_loss_dict(output: LossOutput) -> Dict[str, torch.Tensor]:
    if torch.is_tensor(output):
        return {"loss": output}
    if isinstance(output, Mapping) and output:
        return dict(output)
    raise TypeError(
        "the model (or loss_fn) must return a loss tensor or a non-empty dict of loss tensors, "
        f"got {type(output).__name__}"
    )


def _default_loss_fn(model: nn.Module, batch: Any) -> LossOutput:
    return model(batch)


def _set_epoch_target(loader: Any) -> Any:
    for name in ("batch_sampler", "sampler"):
        target = getattr(loader, name, None)
        if target is not None and callable(getattr(target, "set_epoch", None)):
            return target
    return None


def _accepts_skip(target: Any) -> bool:
    try:
        return "skip_batches" in inspect.signature(target.set_epoch).parameters
    except (TypeError, ValueError):
        return False


class HookBase:
    """Called by the trainer at fixed points; ``self.trainer`` is set when registered.

    Hooks run on every rank (so that they may call collectives); writing files is up to rank 0.
    A hook with state that must survive a resume returns it from ``state_dict``.
    """

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        """After the step that completed an epoch (``trainer.epoch`` = epochs completed)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class Trainer:
    """Runs ``max_iter`` optimizer steps (or ``max_epochs`` passes) of ``model`` on ``data_loader``.

    ``loss_fn(model, batch)`` computes the losses (default: ``model(batch)``); the model passed
    to it is the DDP-wrapped one when training with several ranks. ``precision``: ``fp32``,
    ``bf16`` (CUDA, or a CPU with native bf16; refused otherwise) or ``fp16`` (CUDA, with a
    ``GradScaler``). ``clip_gradients``: a ``GradClip`` or None.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: Optimizer,
        scheduler: Optional[Any] = None,
        *,
        max_iter: Optional[int] = None,
        max_epochs: Optional[int] = None,
        loss_fn: Optional[LossFn] = None,
        grad_accumulation: int = 1,
        clip_gradients: Optional[GradClip] = None,
        precision: str = "fp32",
        device: Optional[torch.device] = None,
        move_batch: bool = True,
        ddp_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        if grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        precision_mod.check_precision(precision, self.device)
        self.precision = precision
        self.rank = comm.rank_info()
        if self.rank.distributed and not torch.distributed.is_initialized():
            raise RuntimeError(
                f"WORLD_SIZE is {self.rank.world_size} but this process has not joined a "
                "process group: call gridfeats.engine.distributed.init_process_group first"
            )
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn or _default_loss_fn
        self.grad_accumulation = int(grad_accumulation)
        self.clip_gradients = clip_gradients
        self.move_batch = move_batch
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        )  # bf16 has fp32's exponent range: no loss scaling needed
        if self.rank.distributed and not isinstance(model, nn.parallel.DistributedDataParallel):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, **(ddp_kwargs or {})
            )
        self.model = model

        try:
            micro = len(data_loader)  # type: ignore[arg-type]
        except TypeError:
            micro = None
        self.micro_batches_per_epoch: Optional[int] = micro
        self.iters_per_epoch: Optional[int] = None
        if micro is not None:
            self.iters_per_epoch = micro // self.grad_accumulation
            if self.iters_per_epoch == 0:
                raise ValueError(
                    f"the data loader yields {micro} batches per epoch, fewer than "
                    f"grad_accumulation={self.grad_accumulation}"
                )
            if micro % self.grad_accumulation:
                warnings.warn(
                    f"{micro % self.grad_accumulation} of the {micro} batches of every epoch "
                    f"are left out: {micro} is not a multiple of grad_accumulation="
                    f"{self.grad_accumulation}",
                    stacklevel=2,
                )
        if max_epochs is not None and max_iter is not None:
            raise ValueError("give max_iter or max_epochs, not both")
        if max_epochs is not None:
            if self.iters_per_epoch is None:
                raise ValueError("max_epochs needs a data loader with a length; give max_iter")
            max_iter = int(max_epochs) * self.iters_per_epoch
        if max_iter is None:
            raise ValueError("give max_iter or max_epochs")
        self.max_iter = int(max_iter)
        self.max_epochs = max_epochs

        self.hooks: List[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.end_of_epoch = False
        self.resumed = False
        self.last_losses: Dict[str, float] = {}
        self.last_lr: Optional[float] = None
        self.latest_eval: Optional[Dict[str, Any]] = None
        self.latest_eval_iter: Optional[int] = None
        self._record_sinks: List[Callable[[Dict[str, Any]], None]] = []
        self._iterator: Optional[Any] = None
        self._epoch_generator_state: Optional[torch.Tensor] = None
        self._resumed_generator_state: Optional[torch.Tensor] = None
        self._pending_rng: Optional[Dict[str, Any]] = None

    # ----------------------------------------------------------------- hooks and records
    @property
    def unwrapped_model(self) -> nn.Module:
        return unwrap(self.model)

    def register_hooks(self, hooks: Sequence[Optional[HookBase]]) -> None:
        """Hooks are called in the order given (None entries are skipped)."""
        for hook in hooks:
            if hook is not None:
                hook.trainer = self
                self.hooks.append(hook)

    def add_record_sink(self, sink: Callable[[Dict[str, Any]], None]) -> None:
        self._record_sinks.append(sink)

    def log(self, kind: str, values: Mapping[str, Any], epoch: Optional[int] = None) -> None:
        """Pass ``{"kind", "step", "epoch", "time", **values}`` to the record writers (rank 0)."""
        if not self.rank.is_main:
            return
        record = {
            "kind": kind,
            "step": self.iter,
            "epoch": self.epoch if epoch is None else epoch,
            "time": time.time(),
            **values,
        }
        for sink in self._record_sinks:
            sink(record)

    def _hook_keys(self) -> List[str]:
        """A name per hook for its checkpointed state: the class name, ``#2``... for repeats
        (so that adding a hook of another kind does not shuffle the others' states)."""
        keys, counts = [], {}
        for hook in self.hooks:
            name = type(hook).__name__
            counts[name] = counts.get(name, 0) + 1
            keys.append(name if counts[name] == 1 else f"{name}#{counts[name]}")
        return keys

    # ----------------------------------------------------------------- checkpoints
    def data_position(self) -> Dict[str, int]:
        """Where the next step's data comes from: ``epoch`` and micro-``batch`` within it."""
        epoch, batch = self.epoch, self.batch_in_epoch
        if self._epoch_complete():
            epoch, batch = epoch + 1, 0
        return {"iteration": self.iter, "epoch": epoch, "batch": batch}

    def _generator_state_for(self, position: Mapping[str, int]) -> Optional[torch.Tensor]:
        generator = getattr(self.data_loader, "generator", None)
        if generator is None:
            return None
        if position["batch"] == 0:
            # The next epoch has not started: its iterator will draw from the current state.
            return generator.get_state()
        return self._epoch_generator_state

    def state_dict(self, rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
        position = self.data_position()
        return {
            "format": TRAINING_STATE_FORMAT,
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "iteration": self.iter,
            "position": position,
            "loader_generator": self._generator_state_for(position),
            "rng": rng_states,  # one per rank: each rank has its own dropout/sampling streams
            "hooks": {key: h.state_dict() for key, h in zip(self._hook_keys(), self.hooks)},
        }

    def save(
        self,
        path: Union[str, os.PathLike],
        extra: Optional[Mapping[str, Any]] = None,
        collective: bool = True,
    ) -> None:
        """Write the training state to ``path`` from rank 0 (atomically).

        ``collective``: every rank calls this at the same step and contributes its generator
        states (resumable checkpoints); otherwise only rank 0 calls it and only its states are
        kept (e.g. a best-model snapshot). ``extra`` entries are added at the top level.
        """
        rng_states = [capture_rng_state()]
        if collective:
            rng_states = comm.all_gather_objects(rng_states)
        if self.rank.is_main:
            payload = self.state_dict(rng_states)
            clash = set(payload) & set(extra or {})
            if clash:
                raise ValueError(f"extra checkpoint entries clash with the engine's: {clash}")
            save_atomic(path, {**payload, **(extra or {})})
        if collective:
            comm.barrier()

    def resume(self, path: Union[str, os.PathLike]) -> Dict[str, Any]:
        """Load a checkpoint written by ``save`` so that ``train`` continues where it stopped.

        Returns the whole payload (the caller's ``extra`` entries included).
        """
        state = load_training_state(path)
        self.unwrapped_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        hook_states = state.get("hooks", {})
        for key, hook in zip(self._hook_keys(), self.hooks):
            if key in hook_states:
                hook.load_state_dict(hook_states[key])
        position = state["position"]
        self.iter = self.start_iter = int(position["iteration"])
        self.epoch, self.batch_in_epoch = int(position["epoch"]), int(position["batch"])
        self._resumed_generator_state = state.get("loader_generator")
        rng_states = state["rng"]
        if len(rng_states) != self.rank.world_size:
            warnings.warn(
                f"the checkpoint was written by {len(rng_states)} ranks and is resumed by "
                f"{self.rank.world_size}: the random streams cannot all continue exactly",
                stacklevel=2,
            )
        self._pending_rng = rng_states[self.rank.rank if self.rank.rank < len(rng_states) else 0]
        self.resumed = True
        return state

    # ----------------------------------------------------------------- data
    def _start_epoch_iterator(self) -> None:
        """Build the iterator of epoch ``self.epoch`` positioned at ``self.batch_in_epoch``."""
        generator = getattr(self.data_loader, "generator", None)
        skip = self.batch_in_epoch
        if generator is not None:
            if self._resumed_generator_state is not None:
                generator.set_state(self._resumed_generator_state)
                self._resumed_generator_state = None
            self._epoch_generator_state = generator.get_state()
        if skip == 0:
            # Nothing to replay: the generators continue from the saved point, and the new
            # iterator draws from them exactly as the uninterrupted run's did.
            self._restore_pending_rng()
        target = _set_epoch_target(self.data_loader)
        # An infinite stream (no length) is one epoch; its sampler may still skip by arithmetic.
        if target is not None and (self.iters_per_epoch is not None or _accepts_skip(target)):
            if _accepts_skip(target):
                target.set_epoch(self.epoch, skip_batches=skip)
                skip = 0
            else:
                target.set_epoch(self.epoch)
        elif skip and generator is None and self.iters_per_epoch is not None:
            warnings.warn(
                "resuming mid-epoch with a data loader that has neither a sampler with "
                "set_epoch nor a generator: the rest of the epoch may see other batches than "
                "the interrupted run would have",
                stacklevel=2,
            )
        self._iterator = iter(self.data_loader)
        for _ in range(skip):
            next(self._iterator)
        self._restore_pending_rng()

    def _restore_pending_rng(self) -> None:
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    def next_batch(self) -> Any:
        """The next micro-batch (on the trainer's device), keeping the data position current.

        A ``run_step`` override (a method that owns its whole update) takes its batches here.
        """
        if self._iterator is None:
            self._start_epoch_iterator()
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise RuntimeError(
                f"the data loader ran out after {self.batch_in_epoch} batches of epoch "
                f"{self.epoch}; its length said {self.micro_batches_per_epoch}"
            ) from None
        self.batch_in_epoch += 1
        return move_to_device(batch, self.device) if self.move_batch else batch

    # ----------------------------------------------------------------- one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        return precision_mod.autocast(self.precision, self.device)

    def run_step(self) -> None:
        """``grad_accumulation`` forward/backward passes; then clip, optimizer and LR step.

        A subclass may replace it (Detectron2's pattern for custom updates); it must take its
        data through ``next_batch`` and set ``last_losses`` (floats) and ``last_lr``.
        """
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.grad_accumulation
        sums: Dict[str, float] = {}
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        for micro in range(accum):
            batch = self.next_batch()
            sync = contextlib.nullcontext()
            if ddp and micro < accum - 1:
                sync = self.model.no_sync()  # all-reduce gradients once, on the last micro-batch
            with sync:
                with self._autocast():
                    loss_dict = _as_loss_dict(self.loss_fn(self.model, batch))
                losses = sum(loss_dict.values())
                if not torch.isfinite(losses).all():
                    values = {k: float(v.detach()) for k, v in loss_dict.items()}
                    raise FloatingPointError(
                        f"loss became non-finite at iteration {self.iter + 1}: {values}"
                    )
                if accum > 1:
                    losses = losses / accum
                if self.scaler is not None:
                    self.scaler.scale(losses).backward()
                else:
                    losses.backward()
            for name, value in loss_dict.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / accum
        if self.clip_gradients is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            self.clip_gradients(p for g in self.optimizer.param_groups for p in g["params"])
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if len(sums) > 1:
            sums["total_loss"] = sum(sums.values())
        self.last_losses = sums

    # ----------------------------------------------------------------- the loop
    def _epoch_complete(self) -> bool:
        return (
            self.iters_per_epoch is not None
            and self.batch_in_epoch >= self.iters_per_epoch * self.grad_accumulation
        )

    def train(self) -> None:
        """Run from ``self.iter`` (0, or where ``resume`` left it) to ``max_iter``."""
        kill_at = os.environ.get(KILL_ENV)
        kill_at = int(kill_at) if kill_at else None
        if self._epoch_complete():
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.model.train()
        for hook in self.hooks:
            hook.before_train()
        try:
            while self.iter < self.max_iter:
                self.end_of_epoch = False
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                self.iter += 1
                self.end_of_epoch = self._epoch_complete()
                for hook in self.hooks:
                    hook.after_step()
                if kill_at is not None and self.iter == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.end_of_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    self._iterator = None
                    for hook in self.hooks:
                        hook.after_epoch()
            self._restore_pending_rng()  # a resumed run that had nothing left to do
            self.end_of_epoch = False
            for hook in self.hooks:
                hook.after_train()
        finally:
            self._iterator = None


__all__ = [
    "GradClip",
    "HookBase",
    "KILL_ENV",
    "Trainer",
    "move_to_device",
    "unwrap",
]
