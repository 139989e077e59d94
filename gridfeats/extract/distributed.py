"""torchrun support: which rank this process is, and the few collective steps the job needs.

``torchrun --nproc_per_node N -m gridfeats extract ...`` (or the same across nodes) starts N
copies of the job with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each rank extracts its
share of the images into its own file; the ranks then meet once (an all-reduce of their counts,
which is also the barrier) and rank 0 merges the files. The process group uses gloo, which runs
everywhere (CPU-only machines included); only a handful of integers cross it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job (rank 0 of 1 when started normally)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "RankInfo":
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (as torchrun sets them)."""
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(
                f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                f"LOCAL_RANK={local}"
            )
        return cls(rank, world, local)


def start(info: RankInfo, timeout_s: float) -> None:
    """Join the process group (env:// rendezvous) when running under torchrun; no-op otherwise.

    ``timeout_s`` bounds how long a rank waits for the slowest one at the end, so it must cover
    the difference in run time between ranks (hours for large data sets).
    """
    if not info.distributed or dist.is_initialized():
        return
    dist.init_process_group(
        "gloo",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def sum_over_ranks(info: RankInfo, values: List[int]) -> List[int]:
    """Element-wise sum of ``values`` over all ranks; doubles as the end-of-work barrier."""
    if not info.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def stop(info: RankInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
