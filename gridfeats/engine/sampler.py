"""Batch order that is a pure function of (seed, epoch, rank), so a resumed run can skip ahead.

The usual ``DataLoader(shuffle=True)`` draws its permutation from a generator whose state is hard
to restore at a batch boundary. Here epoch ``e`` shuffles with ``Generator().manual_seed(seed +
e)``; resuming at batch ``k`` of epoch ``e`` regenerates the same permutation and starts at batch
``k``. Under DDP each rank takes every ``world``-th index of the (padded) permutation, like
``DistributedSampler``, so ranks see disjoint, equally long shards. ``gridfeats.engine.Trainer``
calls ``set_epoch(epoch, skip_batches)`` itself, so a resume reads no skipped data.
"""

from __future__ import annotations

import math
from typing import Iterator, List

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[List[int]]):
    """Yields lists of dataset indices; call ``set_epoch(epoch, skip_batches)`` before iterating."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError("cannot sample batches from an empty data set")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _shard(self) -> List[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        per_rank = math.ceil(self.dataset_size / self.world_size)
        order += order[: per_rank * self.world_size - len(order)]  # pad so shards are equal
        return order[self.rank :: self.world_size]

    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.dataset_size / self.world_size)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.skip_batches

    def __iter__(self) -> Iterator[List[int]]:
        shard = self._shard()
        for index in range(self.skip_batches, self.batches_per_epoch()):
            yield shard[index * self.batch_size : (index + 1) * self.batch_size]
