"""The training loop shared by the VQA and captioning heads.

What the loop owns: batching in a resumable order, optimizer/scheduler steps, gradient clipping,
DDP, periodic and end-of-epoch checkpoints, evaluation, the metrics log and the progress bar.
What a task owns (``TrainingTask``): the model, the data, the loss and the evaluation metric.

Resume contract: ``last.pt`` is written every ``train.checkpoint_every_steps`` optimizer steps
and at every epoch end, holding the full training state (``vqa.engine.checkpoint``). Restarting
with ``resume=True`` continues from it; with ``train.deterministic`` on CPU the final weights and
metrics equal those of an uninterrupted run with the same seed.

Test hook: if the environment variable ``GRIDFEATS_KILL_AT_STEP`` is set to ``N``, the process
SIGKILLs itself right after optimizer step ``N`` (after any checkpoint of that step), which is
how the tests simulate a crash at an exact point mid-epoch.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vqa.engine.checkpoint import (
    BEST,
    FINAL,
    LAST,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from vqa.engine.determinism import enable_deterministic_mode, seed_everything
from vqa.engine.distributed import DistInfo, all_gather_objects, barrier
from vqa.engine.metrics_log import MetricsLog
from vqa.engine.optimizers import build_optimizer
from vqa.engine.sampler import ResumableBatchSampler
from vqa.engine.schedules import build_scheduler

KILL_ENV = "GRIDFEATS_KILL_AT_STEP"
METRICS_FILE = "metrics.jsonl"


class TrainingTask(Protocol):
    """What the loop needs from a head (see ``vqa.engine.vqa_task``/``caption_task``)."""

    kind: str
    model: nn.Module
    train_dataset: Dataset

    def collate(self, samples: List[Any]) -> Dict[str, Any]: ...

    def training_loss(
        self, model: nn.Module, batch: Dict[str, Any], epoch: int
    ) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module) -> Dict[str, Any]: ...

    def checkpoint_state(self) -> Dict[str, Any]: ...

    def step_stats(self) -> Dict[str, float]:
        """Extra numbers about the last training step for the log (e.g. SCST rewards)."""
        ...


@dataclass
class Position:
    """Where training stands: the next batch to run is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_score: Optional[float] = None


def move_to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _kill_step() -> Optional[int]:
    value = os.environ.get(KILL_ENV)
    return int(value) if value else None


class Trainer:
    """Runs ``task`` under ``cfg`` (the full config dict), writing into ``out_dir``."""

    def __init__(
        self,
        task: TrainingTask,
        cfg: Mapping[str, Any],
        out_dir: Path,
        device: torch.device,
        dist_info: DistInfo = DistInfo(),
    ) -> None:
        self.task = task
        self.cfg = cfg
        self.train_cfg = cfg["train"]
        self.out_dir = Path(out_dir)
        self.device = device
        self.dist = dist_info
        self.sampler = ResumableBatchSampler(
            len(task.train_dataset),
            int(self.train_cfg["batch_size"]),
            seed=int(self.train_cfg["seed"]),
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        task.model.to(device)
        self.optimizer = build_optimizer(task.model.parameters(), cfg["optim"])
        self.scheduler = build_scheduler(self.optimizer, cfg["schedule"], self.steps_per_epoch)
        self.position = Position()

    # ----------------------------------------------------------------- checkpoints
    def _training_state(self, rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {
            "kind": self.task.kind,
            "config": dict(self.cfg),
            "model": unwrap(self.task.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states,  # one per rank: each DDP rank has its own dropout stream
            "position": vars(self.position).copy(),
            "task": self.task.checkpoint_state(),
        }

    def _save(
        self, name: str, extra: Optional[Dict[str, Any]] = None, collective: bool = True
    ) -> None:
        """Writes a checkpoint from rank 0. ``collective``: every rank calls this (at the same
        step) and contributes its RNG state; otherwise only rank 0's is kept (``best.pt``)."""
        rng_states = [capture_rng_state()]
        if collective:
            rng_states = all_gather_objects(rng_states, self.dist)
        if self.dist.is_main:
            save_checkpoint(
                self.out_dir / name, {**self._training_state(rng_states), **(extra or {})}
            )

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, kind=self.task.kind)
        unwrap(self.task.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng_states = state["rng"]
        # A resume with another world size cannot continue every stream; rank 0's is reused.
        restore_rng_state(rng_states[self.dist.rank if self.dist.rank < len(rng_states) else 0])
        self.position = Position(**state["position"])

    # ----------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> Dict[str, Any]:
        """Trains to ``train.epochs`` and returns the last evaluation's metrics."""
        if self.train_cfg["deterministic"]:
            enable_deterministic_mode()
        seed_everything(int(self.train_cfg["seed"]) + self.dist.rank)
        last = self.out_dir / LAST
        resumed = resume and last.is_file()
        if resumed:
            self._restore(last)
        log = None
        if self.dist.is_main:
            tb_dir = self.out_dir / "tensorboard" if self.train_cfg["tensorboard"] else None
            log = MetricsLog(
                self.out_dir / METRICS_FILE,
                tb_dir,
                resume_from_step=self.position.global_step if resumed else None,
            )
        model = self._wrap_ddp(self.task.model)
        loader = DataLoader(
            self.task.train_dataset,
            batch_sampler=self.sampler,
            collate_fn=self.task.collate,
            num_workers=int(self.train_cfg["num_workers"]),
            # A private generator keeps DataLoader from drawing on the global
            # RNG, whose state is part of the checkpoint.
            generator=torch.Generator(),
        )
        epochs = int(self.train_cfg["epochs"])
        metrics: Dict[str, Any] = {}
        kill_at = _kill_step()
        try:
            while self.position.epoch < epochs:
                self._run_epoch(model, loader, log, kill_at)
                metrics = self._end_epoch(log, epochs) or metrics
            if not metrics and self.dist.is_main:
                metrics = self.task.evaluate(unwrap(model))
            self._save(FINAL, {"metrics": metrics})
            barrier(self.dist)
        finally:
            if log is not None:
                log.close()
        return metrics

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def _run_epoch(
        self,
        model: nn.Module,
        loader: DataLoader,
        log: Optional[MetricsLog],
        kill_at: Optional[int],
    ) -> None:
        pos = self.position
        self.sampler.set_epoch(pos.epoch, skip_batches=pos.batch)
        model.train()
        clip = float(self.cfg["optim"]["grad_clip"])
        every_ckpt = int(self.train_cfg["checkpoint_every_steps"])
        every_log = max(1, int(self.train_cfg["log_every_steps"]))
        show = bool(self.train_cfg["progress"]) and self.dist.is_main
        bar = tqdm(
            loader,
            total=self.steps_per_epoch,
            initial=pos.batch,
            disable=not show,
            desc=f"epoch {pos.epoch + 1}",
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            batch = move_to_device(batch, self.device)
            loss = self.task.training_loss(model, batch, pos.epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at step {pos.global_step + 1}; "
                    "lower optim.lr or enable optim.grad_clip"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            pos.batch += 1
            pos.global_step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if log is not None and pos.global_step % every_log == 0:
                log.log(
                    "train",
                    pos.global_step,
                    pos.epoch,
                    loss=loss.item(),
                    lr=lr,
                    **self.task.step_stats(),
                )
            if (
                every_ckpt
                and pos.global_step % every_ckpt == 0
                and pos.batch < self.steps_per_epoch
            ):
                self._save(LAST)
            if kill_at is not None and pos.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()

    def _end_epoch(self, log: Optional[MetricsLog], epochs: int) -> Optional[Dict[str, Any]]:
        pos = self.position
        finished_epoch = pos.epoch + 1
        pos.epoch, pos.batch = finished_epoch, 0
        every_eval = max(1, int(self.train_cfg["eval_every_epochs"]))
        metrics = None
        if self.dist.is_main and (finished_epoch % every_eval == 0 or finished_epoch == epochs):
            metrics = self.task.evaluate(unwrap(self.task.model))
            if log is not None:
                log.log("eval", pos.global_step, finished_epoch, **metrics)
            score = metrics.get("score")
            if score is not None and (pos.best_score is None or score > pos.best_score):
                pos.best_score = float(score)
                self._save(BEST, {"metrics": metrics}, collective=False)
        self._save(LAST)
        barrier(self.dist)
        return metrics
