"""The trainer's standard hooks: checkpoints, evaluation, the metrics log and progress bar, EMA.

Every hook runs on every rank; those that write files do it from rank 0 only, and those that call
collectives (checkpoints gather each rank's generator states, the metrics writer averages the
losses over ranks) do it at the same step on all ranks. Order matters and is the caller's: the
usual one is ``[MetricsWriter, EMA, EvalHook, BestCheckpointer, PeriodicCheckpointer]``, so that a
step's record is written before the checkpoint of that step and an evaluation's result is in the
checkpoint written after it.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch
from tqdm import tqdm

from gridfeats.engine import distributed as comm
from gridfeats.engine.metrics_log import MetricsLog
from gridfeats.engine.trainer import HookBase

PathLike = Union[str, "os.PathLike[str]"]
ExtraState = Callable[[], Mapping[str, Any]]

LAST = "last.pt"
FINAL = "final.pt"
BEST = "best.pt"


class PeriodicCheckpointer(HookBase):
    """Keeps ``OUT/last.pt`` current (every ``period`` steps and at every epoch end) for resume,
    and writes ``OUT/final.pt`` when training ends.

    ``extra_state()`` adds the caller's entries (its config, vocabularies...) to every file; the
    final file also gets ``metrics`` (the latest evaluation). ``period`` 0: only at epoch ends
    (and at the end); ``epoch_end`` False: only every ``period`` steps (iteration-based runs).
    """

    def __init__(
        self,
        out_dir: PathLike,
        period: int = 0,
        epoch_end: bool = True,
        extra_state: Optional[ExtraState] = None,
        last_name: str = LAST,
        final_name: Optional[str] = FINAL,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.period = int(period)
        self.epoch_end = epoch_end
        self.extra_state = extra_state or dict
        self.last_name = last_name
        self.final_name = final_name
        self._saved_at: Optional[int] = None

    def save_last(self) -> None:
        self.trainer.save(self.out_dir / self.last_name, dict(self.extra_state()))
        self._saved_at = self.trainer.iter

    def after_step(self) -> None:
        t = self.trainer
        if not self.period or t.iter % self.period or t.iter >= t.max_iter:
            return
        if self.epoch_end and t.end_of_epoch:
            return  # after_epoch writes it, after the epoch's evaluation
        self.save_last()

    def after_epoch(self) -> None:
        if self.epoch_end:
            self.save_last()

    def after_train(self) -> None:
        t = self.trainer
        if self._saved_at != t.iter:
            self.save_last()
        if self.final_name:
            extra = {**self.extra_state(), "metrics": t.latest_eval or {}}
            t.save(self.out_dir / self.final_name, extra)


class EvalHook(HookBase):
    """Runs ``eval_fn()`` (a dict of metrics) every ``period`` steps and/or every
    ``epoch_period`` epochs (and after the last epoch), and once at the end of training if the
    last step was not evaluated. The result goes to ``trainer.latest_eval`` and to the metrics
    log as an ``eval`` record. ``main_only``: evaluate on rank 0 only (the other ranks wait at
    the next collective).
    """

    def __init__(
        self,
        eval_fn: Callable[[], Optional[Mapping[str, Any]]],
        period: int = 0,
        epoch_period: int = 0,
        main_only: bool = True,
        at_end: bool = True,
    ) -> None:
        self.eval_fn = eval_fn
        self.period = int(period)
        self.epoch_period = int(epoch_period)
        self.main_only = main_only
        self.at_end = at_end
        self._evaluated_at: Optional[int] = None

    def _evaluate(self) -> None:
        t = self.trainer
        self._evaluated_at = t.iter
        if self.main_only and not t.rank.is_main:
            return
        was_training = t.model.training
        results = dict(self.eval_fn() or {})
        t.model.train(was_training)
        t.latest_eval, t.latest_eval_iter = results, t.iter
        if results:
            t.log("eval", results)

    def after_step(self) -> None:
        t = self.trainer
        if self.period and t.iter % self.period == 0 and not t.end_of_epoch:
            self._evaluate()

    def after_epoch(self) -> None:
        t = self.trainer
        if not (self.period or self.epoch_period):
            return
        last = t.iter >= t.max_iter
        if (self.epoch_period and t.epoch % self.epoch_period == 0) or last:
            self._evaluate()
        elif self.period and t.iter % self.period == 0:
            self._evaluate()

    def after_train(self) -> None:
        if self.at_end and self._evaluated_at != self.trainer.iter:
            self._evaluate()


class BestCheckpointer(HookBase):
    """Writes ``path`` (rank 0, with ``metrics``) whenever ``metric`` of a new evaluation beats the
    best so far (``mode`` max or min). Place it after the ``EvalHook``."""

    def __init__(
        self,
        path: PathLike,
        metric: str = "score",
        mode: str = "max",
        extra_state: Optional[ExtraState] = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got {mode!r}")
        self.path = Path(path)
        self.metric = metric
        self.mode = mode
        self.extra_state = extra_state or dict
        self.best: Optional[float] = None
        self._seen_iter: Optional[int] = None

    def _check(self) -> None:
        t = self.trainer
        if t.latest_eval_iter is None or t.latest_eval_iter == self._seen_iter:
            return
        self._seen_iter = t.latest_eval_iter
        value = (t.latest_eval or {}).get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
            extra = {**self.extra_state(), "metrics": dict(t.latest_eval or {})}
            t.save(self.path, extra, collective=False)

    def after_step(self) -> None:
        self._check()

    def after_epoch(self) -> None:
        self._check()

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state.get("best")


class MetricsWriter(HookBase):
    """JSON lines in ``path`` (rank 0) and a tqdm bar with the losses and the ETA.

    Every ``period`` steps a ``train`` record holds the step's losses (averaged over ranks), the
    learning rate the step used (``lr``, parameter group 0) and ``extra_metrics()`` (this rank's).
    Records from other hooks (``eval``) come through ``trainer.log``. On resume the records newer
    than the resumed step are dropped first, so the log reads like an uninterrupted run's.
    """

    def __init__(
        self,
        path: PathLike,
        period: int = 20,
        extra_metrics: Optional[Callable[[], Mapping[str, float]]] = None,
        progress: bool = True,
        tensorboard_dir: Optional[PathLike] = None,
        description: str = "train",
    ) -> None:
        self.path = Path(path)
        self.period = max(1, int(period))
        self.extra_metrics = extra_metrics
        self.progress = progress
        self.tensorboard_dir = tensorboard_dir
        self.description = description
        self._log: Optional[MetricsLog] = None
        self._bar: Optional[tqdm] = None

    def before_train(self) -> None:
        t = self.trainer
        if not t.rank.is_main:
            return
        self._log = MetricsLog(
            self.path,
            self.tensorboard_dir,
            resume_from_step=t.start_iter if t.resumed else None,
        )
        t.add_record_sink(self._log.write)
        self._bar = tqdm(
            total=t.max_iter,
            initial=t.iter,
            disable=not self.progress,
            desc=self.description,
            dynamic_ncols=True,
            leave=False,
        )

    def after_step(self) -> None:
        t = self.trainer
        if self._bar is not None:
            self._bar.update(1)
        if t.iter % self.period and t.iter != t.max_iter:
            return
        losses = comm.all_reduce_scalars(t.last_losses)
        if self._bar is not None:
            postfix = {k: f"{v:.4f}" for k, v in losses.items()}
            if t.iters_per_epoch is not None:
                postfix["epoch"] = t.epoch + 1
            self._bar.set_postfix(postfix, lr=f"{t.last_lr:.2e}", refresh=False)
        extra = dict(self.extra_metrics()) if self.extra_metrics is not None else {}
        t.log("train", {**losses, "lr": t.last_lr, **extra})

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._log is not None:
            self._log.flush()


class EMA(HookBase):
    """An exponential moving average of the model's floating-point parameters and buffers.

    ``decay`` per step (``ema = decay * ema + (1 - decay) * weight``); integer buffers (BN step
    counts) are copied. The average is part of the checkpoint. ``with ema.applied():`` swaps it
    into the model (e.g. inside an evaluation function) and swaps the live weights back after.
    """

    def __init__(self, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: Optional[Dict[str, torch.Tensor]] = None

    def _live(self) -> Dict[str, torch.Tensor]:
        return self.trainer.unwrapped_model.state_dict()

    def before_train(self) -> None:
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in self._live().items()}

    @torch.no_grad()
    def after_step(self) -> None:
        for name, value in self._live().items():
            average = self.shadow[name]
            if average.is_floating_point():
                average.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                average.copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        model = self.trainer.unwrapped_model
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(live)

    def state_dict(self) -> Dict[str, Any]:
        return {"shadow": self.shadow, "decay": self.decay}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("shadow") is not None:
            self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
        if state.get("decay") not in (None, self.decay):
            warnings.warn(
                f"EMA decay {self.decay} differs from the checkpoint's {state['decay']}",
                stacklevel=2,
            )
