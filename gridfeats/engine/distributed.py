"""Rank information under torchrun, and the few collective steps training and extraction need.

``torchrun --nproc_per_node N -m gridfeats ...`` starts N copies of a command with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; a plain run has none of them, and then everything here is a
single-process no-op, so callers keep one code path for both. The process group uses gloo on the
CPU (it runs everywhere, CPU-only machines included) and NCCL when the work runs on GPUs; NCCL only
moves CUDA tensors, so the collectives below put their small tensors on the group's device.

This is the project's one place for rank information: the training engine, the heads and
``gridfeats extract`` all read it from here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.distributed as dist

#: How long a rank waits for the slowest one at a collective, unless the caller says otherwise.
DEFAULT_TIMEOUT_S = 1800.0


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


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank: from the process group once joined, else from the environment."""
    return dist.get_rank() if _group_active() else RankInfo.from_env().rank


def get_world_size() -> int:
    return dist.get_world_size() if _group_active() else RankInfo.from_env().world_size


def get_local_rank() -> int:
    return RankInfo.from_env().local_rank


def is_main_process() -> bool:
    return get_rank() == 0


def rank_info() -> RankInfo:
    """The current process's ``RankInfo`` (the process group's numbers once it is joined)."""
    return RankInfo(get_rank(), get_world_size(), get_local_rank())


def resolve_device(name: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """``auto`` picks the local GPU when there is one (one GPU per torchrun process), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("the device is 'cuda' but no CUDA device is available")
        index = get_local_rank() if local_rank is None else local_rank
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name != "cpu":
        raise ValueError(f"the device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def init_process_group(
    info: RankInfo,
    device: Union[str, torch.device] = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Join the process group (env:// rendezvous) under torchrun; a no-op for one process.

    ``device`` is where the job's tensors live: gloo for the CPU, NCCL for CUDA. ``timeout_s``
    bounds how long a rank waits for the slowest one at a collective, so it must cover the
    difference in run time between ranks (hours for large extraction jobs).
    """
    if not info.distributed or _group_active():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def destroy_process_group() -> None:
    """Leave the process group if this process joined one."""
    if _group_active():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_world_size() -> int:
    """The joined process group's size; 1 without one (whatever ``WORLD_SIZE`` says)."""
    return dist.get_world_size() if _group_active() else 1


def barrier() -> None:
    if _group_active() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_scalars(values: Mapping[str, float], average: bool = True) -> Dict[str, float]:
    """Sum (or mean, with ``average``) of each named scalar over all ranks, in float64.

    Every rank must pass the same keys; the keys are sorted so that insertion order does not
    matter. Identity in a single process.
    """
    if not _group_active() or dist.get_world_size() == 1 or not values:
        return {k: float(v) for k, v in values.items()}
    names = sorted(values)
    tensor = torch.tensor(
        [float(values[k]) for k in names], dtype=torch.float64, device=_collective_device()
    )
    dist.all_reduce(tensor)
    if average:
        tensor /= dist.get_world_size()
    return dict(zip(names, tensor.tolist()))


def sum_over_ranks(values: List[int]) -> List[int]:
    """Element-wise sum of integer counts over all ranks; doubles as a barrier."""
    if not _group_active() or dist.get_world_size() == 1:
        return [int(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def all_gather_objects(items: List[Any]) -> List[Any]:
    """Every rank's ``items`` concatenated in rank order (picklable objects); identity alone."""
    if not _group_active() or dist.get_world_size() == 1:
        return list(items)
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]
