"""DDP through torchrun: process-group setup from the environment and small collective helpers.

``torchrun --nproc_per_node N -m gridfeats vqa train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; a
plain run has none of them and everything here degrades to single-process no-ops, so the
training code has one path for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the torchrun process group if this process was started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def resolve_device(name: str, info_local_rank: int = 0) -> torch.device:
    """``auto`` picks the local GPU when there is one (one GPU per torchrun process)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", str(info_local_rank)))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def all_gather_objects(items: List[Any], info: DistInfo) -> List[Any]:
    """Concatenates every rank's ``items`` (in rank order); identity when not distributed."""
    if not info.enabled:
        return items
    gathered: List[List[Any]] = [None] * info.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
