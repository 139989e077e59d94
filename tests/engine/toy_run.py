"""A seconds-long training run on the engine, for the kill/resume and torchrun tests.

    python -m tests.engine.toy_run --out DIR [--loader resumable|shuffle] [--resume]
        [--batch-size 8] [--accumulation 1] [--dropout 0.2]

The run uses every source of randomness a real one does: dropout (torch), noise added by the
data set (torch, NumPy and Python generators), a shuffled data order, and an EMA, an evaluation,
a metrics log and periodic checkpoints as hooks. ``--loader resumable`` orders data with the
engine's ``ResumableBatchSampler`` (resume skips batches without reading them), ``shuffle`` with a
plain ``DataLoader(shuffle=True, generator=...)`` (resume re-draws the epoch and discards batches).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gridfeats.engine import (
    GradClip,
    ResumableBatchSampler,
    Trainer,
    build_param_groups,
    distributed,
    hooks,
    seed_all_rngs,
)

NUM_SAMPLES = 40
FEATURES = 6


class NoisyRegression(Dataset):
    """y = x @ w + noise; the noise is drawn at read time from all three global generators."""

    def __init__(self, noise: bool = True) -> None:
        generator = torch.Generator().manual_seed(123)
        self.x = torch.randn(NUM_SAMPLES, FEATURES, generator=generator)
        self.y = self.x @ torch.randn(FEATURES, 1, generator=generator)
        self.noise = noise

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        x = self.x[index]
        if self.noise:
            scale = 0.05 * (1.0 + random.random()) * float(np.random.uniform(0.5, 1.5))
            x = x + scale * torch.randn(FEATURES)
        return {"x": x, "y": self.y[index]}


class ToyModel(nn.Module):
    """A model whose forward returns Detectron2-style named losses."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(FEATURES, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(dropout)
        )
        self.head = nn.Linear(16, 1)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        pred = self.head(self.body(batch["x"]))
        return {
            "loss_mse": nn.functional.mse_loss(pred, batch["y"]),
            "loss_l1": 0.1 * nn.functional.l1_loss(pred, batch["y"]),
        }


def make_loader(kind: str, batch_size: int, noise: bool = True) -> DataLoader:
    dataset = NoisyRegression(noise)
    if kind == "resumable":
        rank = distributed.rank_info()
        sampler = ResumableBatchSampler(
            len(dataset), batch_size, seed=7, rank=rank.rank, world_size=rank.world_size
        )
        return DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator())
    if kind == "shuffle":
        generator = torch.Generator().manual_seed(7)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    raise ValueError(f"unknown loader kind {kind!r}")


def evaluate(model: nn.Module) -> Dict[str, float]:
    data = NoisyRegression(noise=False)
    model.eval()
    with torch.no_grad():
        losses = model({"x": data.x, "y": data.y})
    return {"score": -float(losses["loss_mse"])}


def run(
    out: Path,
    loader: str = "resumable",
    resume: bool = False,
    batch_size: int = 8,
    accumulation: int = 1,
    dropout: float = 0.2,
    epochs: int = 3,
    noise: bool = True,
    checkpoint_period: int = 3,
) -> Trainer:
    """Train from scratch (or from ``out/last.pt`` with ``resume``) and return the trainer."""
    # No enable_deterministic_mode(): the CPU kernels used here are deterministic already, and
    # torch.use_deterministic_algorithms imports the compiler stack (seconds).
    torch.set_num_threads(1)
    seed_all_rngs(0)
    model = ToyModel(dropout)
    data = make_loader(loader, batch_size, noise)
    optimizer = torch.optim.SGD(
        build_param_groups(model, weight_decay=1e-3, weight_decay_norm=0.0),
        lr=0.05,
        momentum=0.9,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[6, 11], gamma=0.5)
    trainer = Trainer(
        model,
        data,
        optimizer,
        scheduler,
        max_epochs=epochs,
        grad_accumulation=accumulation,
        clip_gradients=GradClip("norm", 2.0),
    )
    ema = hooks.EMA(decay=0.9)
    trainer.register_hooks(
        [
            hooks.MetricsWriter(out / "metrics.jsonl", period=1, progress=False),
            ema,
            hooks.EvalHook(lambda: evaluate(trainer.unwrapped_model), epoch_period=1),
            hooks.BestCheckpointer(out / "best.pt"),
            hooks.PeriodicCheckpointer(
                out, period=checkpoint_period, extra_state=lambda: {"note": "toy"}
            ),
        ]
    )
    if resume and (out / "last.pt").is_file():
        trainer.resume(out / "last.pt")
    trainer.train()
    return trainer


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loader", default="resumable", choices=("resumable", "shuffle"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--no-noise", action="store_true")
    args = parser.parse_args(argv)
    info = distributed.RankInfo.from_env()
    distributed.init_process_group(info)
    try:
        run(
            args.out,
            args.loader,
            args.resume,
            args.batch_size,
            args.accumulation,
            args.dropout,
            noise=not args.no_noise,
        )
    finally:
        distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
