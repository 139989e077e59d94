"""How the VQA and captioning heads train on the project's engine (``gridfeats.engine``).

A head is a ``TrainingTask`` (its model, data, loss and evaluation metric); ``fit_task`` builds
what the engine needs from the config and runs it: the resumable batch order, the optimizer and
LR schedule, gradient clipping/accumulation and precision from ``optim``/``train``, and the hooks
(metrics log, evaluation at epoch ends, ``best.pt``, ``last.pt``, ``final.pt``).

Resume contract: ``last.pt`` is written every ``train.checkpoint_every_steps`` optimizer steps
and at every epoch end, holding the full training state plus the head's own entries (``kind``,
``config``, ``task``: its vocabularies). Restarting with ``resume=True`` continues from it; with
``train.deterministic`` on CPU the final weights and metrics equal those of an uninterrupted run
with the same seed (``GRIDFEATS_KILL_AT_STEP`` crashes a run at an exact step for the tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gridfeats.engine import (
    GradClip,
    RankInfo,
    ResumableBatchSampler,
    Trainer,
    enable_deterministic_mode,
    hooks,
    seed_all_rngs,
    unwrap,
)
from vqa.engine.checkpoint import (
    BEST,
    FINAL,
    LAST,
    PRE_ENGINE_FORMAT,
    CheckpointError,
    load_checkpoint,
)
from vqa.engine.optimizers import build_optimizer
from vqa.engine.schedules import build_scheduler

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


def _grad_clip(optim_cfg: Mapping[str, Any]) -> Optional[GradClip]:
    value = float(optim_cfg["grad_clip"])
    if value <= 0:
        return None
    return GradClip(str(optim_cfg["grad_clip_type"]), value)


def build_trainer(
    task: TrainingTask,
    cfg: Mapping[str, Any],
    out_dir: Path,
    device: torch.device,
    rank: RankInfo = RankInfo(),
) -> Trainer:
    """The engine set up for ``task`` under ``cfg`` (the full config dict), writing ``out_dir``."""
    train_cfg = cfg["train"]
    out_dir = Path(out_dir)
    sampler = ResumableBatchSampler(
        len(task.train_dataset),
        int(train_cfg["batch_size"]),
        seed=int(train_cfg["seed"]),
        rank=rank.rank,
        world_size=rank.world_size,
    )
    loader = DataLoader(
        task.train_dataset,
        batch_sampler=sampler,
        collate_fn=task.collate,
        num_workers=int(train_cfg["num_workers"]),
        # A private generator keeps DataLoader from drawing on the global
        # RNG, whose state is part of the checkpoint.
        generator=torch.Generator(),
    )
    accumulation = int(train_cfg["grad_accumulation"])
    steps_per_epoch = len(loader) // accumulation
    task.model.to(device)
    optimizer = build_optimizer(task.model, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["schedule"], max(1, steps_per_epoch))
    trainer: Trainer

    def loss_fn(model: nn.Module, batch: Dict[str, Any]) -> torch.Tensor:
        return task.training_loss(model, batch, trainer.epoch)

    trainer = Trainer(
        task.model,
        loader,
        optimizer,
        scheduler,
        max_epochs=int(train_cfg["epochs"]),
        loss_fn=loss_fn,
        grad_accumulation=accumulation,
        clip_gradients=_grad_clip(cfg["optim"]),
        precision=str(train_cfg["precision"]),
        device=device,
    )

    def head_state() -> Dict[str, Any]:
        return {"kind": task.kind, "config": dict(cfg), "task": task.checkpoint_state()}

    tensorboard = out_dir / "tensorboard" if train_cfg["tensorboard"] else None
    trainer.register_hooks(
        [
            hooks.MetricsWriter(
                out_dir / METRICS_FILE,
                period=int(train_cfg["log_every_steps"]),
                extra_metrics=task.step_stats,
                progress=bool(train_cfg["progress"]),
                tensorboard_dir=tensorboard,
                description=task.kind,
            ),
            hooks.EvalHook(
                lambda: task.evaluate(unwrap(trainer.model)),
                epoch_period=max(1, int(train_cfg["eval_every_epochs"])),
            ),
            hooks.BestCheckpointer(out_dir / BEST, metric="score", extra_state=head_state),
            hooks.PeriodicCheckpointer(
                out_dir,
                period=int(train_cfg["checkpoint_every_steps"]),
                extra_state=head_state,
                last_name=LAST,
                final_name=FINAL,
            ),
        ]
    )
    return trainer


def fit_task(
    task: TrainingTask,
    cfg: Mapping[str, Any],
    out_dir: Path,
    device: torch.device,
    rank: RankInfo = RankInfo(),
    resume: bool = False,
) -> Dict[str, Any]:
    """Trains ``task`` to ``train.epochs`` and returns the last evaluation's metrics."""
    train_cfg = cfg["train"]
    if train_cfg["deterministic"]:
        enable_deterministic_mode()
    seed_all_rngs(int(train_cfg["seed"]) + rank.rank)
    trainer = build_trainer(task, cfg, out_dir, device, rank)
    last = Path(out_dir) / LAST
    if resume and last.is_file():
        saved = load_checkpoint(last, kind=task.kind)  # refuses another head's run folder
        if saved["format"] == PRE_ENGINE_FORMAT:
            raise CheckpointError(
                f"{last} was written before the heads trained on gridfeats.engine: predict can "
                "use it, but it holds no resumable training state"
            )
        trainer.resume(last)
    trainer.train()
    return dict(trainer.latest_eval or {})
