"""Detectron2's training stream (``TrainingSampler``) and aspect-ratio grouping, made resumable.

* The stream is ``randperm(N) + randperm(N) + ...`` from one ``torch.Generator`` seeded with
  ``seed``; rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...`` (Detectron2's
  ``TrainingSampler``).
* Grouping (``DATALOADER.ASPECT_RATIO_GROUPING``): per rank, images go into two buckets, landscape
  (original ``width > height``) and the rest; a bucket that reaches the batch size is emitted.
  Detectron2 does this after loading, in stream order; since the aspect ratio is in the json, it
  is done here on indices, which yields the same batches without loading anything.
* Every element is a key ``(position, index)``: ``position`` in the global stream fixes the
  mapper's random draws, so batches (content and augmentation) are a pure function of
  ``(seed, batch number)``. ``start_batch`` skips batches by index arithmetic only: a resumed run
  sees exactly the batches an uninterrupted run would have seen next.
* ``SOLVER.RANK_INVARIANT``: every item also gets ``"sampling_seed"``, :func:`sampling_seed` of
  ``(seed, position)``; ``position`` is the global one (``training_stream`` enumerates before it
  splits over ranks), so an image has the same seed on rank 1 of 2 as in a one-process batch, and
  the model samples its anchors and proposals from a generator seeded with it.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Key = Tuple[int, int]  # (position in the global stream, dataset index)


def training_stream(
    size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
) -> Iterator[Key]:
    """Infinite ``(position, index)`` keys of this rank (see the module docstring)."""
    if size <= 0:
        raise ValueError("cannot train on an empty dataset")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")

    def indices() -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(int(seed))
        while True:
            order = torch.randperm(size, generator=g) if shuffle else torch.arange(size)
            yield from order.tolist()

    stream = enumerate(indices())
    return itertools.islice(stream, rank, None, world_size)


def aspect_ratio_groups(records: Sequence[Dict[str, Any]]) -> List[int]:
    """Bucket id per record: 0 = landscape (``width > height``), 1 = portrait or square."""
    return [0 if r["width"] > r["height"] else 1 for r in records]


class TrainBatchSampler:
    """Infinite batches of keys for one rank; pass as ``DataLoader(batch_sampler=...)``."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        groups: Optional[Sequence[int]] = None,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle: bool = True,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if groups is not None and len(groups) != size:
            raise ValueError("one aspect-ratio group per record is needed")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.groups = None if groups is None else list(groups)
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch
        self.shuffle = shuffle

    def _batches(self) -> Iterator[List[Key]]:
        stream = training_stream(self.size, self.seed, self.shuffle, self.rank, self.world_size)
        if self.groups is None:
            while True:
                yield list(itertools.islice(stream, self.batch_size))
        buckets: Dict[int, List[Key]] = {}
        for key in stream:
            bucket = buckets.setdefault(self.groups[key[1]], [])
            bucket.append(key)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The engine's resume call: the stream is one endless epoch (``epoch`` is not used) and
        the next iteration starts ``skip_batches`` batches in, by index arithmetic only."""
        self.start_batch = int(skip_batches)

    def __iter__(self) -> Iterator[List[Key]]:
        return itertools.islice(self._batches(), self.start_batch, None)


def sampling_seed(seed: int, position: int) -> int:
    """The seed (63 bits) of the generator that samples the anchors and proposals of the image at
    global stream ``position`` (``SOLVER.RANK_INVARIANT``): a pure function of the run seed and the
    position, independent of the mapper's draws (a child of their ``SeedSequence``)."""
    child = np.random.SeedSequence([int(seed), int(position)]).spawn(1)[0]
    return int(child.generate_state(1, np.uint64)[0] >> np.uint64(1))


class MappedDetectionDataset(Dataset):
    """``dataset[(position, index)] = mapper(records[index], rng(seed, position))``, with
    ``"sampling_seed"`` added when ``sampling_seeds`` (see the module docstring)."""

    def __init__(
        self,
        records: Sequence[Dict[str, Any]],
        mapper: Callable[[Dict[str, Any], np.random.Generator], Dict[str, Any]],
        seed: int,
        sampling_seeds: bool = False,
    ):
        self.records = list(records)
        self.mapper = mapper
        self.seed = int(seed)
        self.sampling_seeds = bool(sampling_seeds)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        position, index = key
        rng = np.random.default_rng([self.seed, int(position)])
        item = self.mapper(self.records[index], rng)
        if self.sampling_seeds:
            item = {**item, "sampling_seed": sampling_seed(self.seed, position)}
        return item


def _list_collate(batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return batch


def build_detection_train_loader(
    cfg,
    records: Sequence[Dict[str, Any]],
    mapper: Callable[[Dict[str, Any], np.random.Generator], Dict[str, Any]],
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> DataLoader:
    """An infinite loader of ``list[dict]`` batches of ``SOLVER.IMS_PER_BATCH / world_size`` images,
    with ``DATALOADER.NUM_WORKERS`` workers and ``DATALOADER.ASPECT_RATIO_GROUPING`` (each item
    with its ``"sampling_seed"`` under ``SOLVER.RANK_INVARIANT``)."""
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total % world_size != 0 or total < world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the {world_size} ranks"
        )
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported"
        )
    groups = aspect_ratio_groups(records) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    sampler = TrainBatchSampler(
        len(records), total // world_size, seed, groups, rank, world_size, start_batch
    )
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return DataLoader(
        MappedDetectionDataset(
            records, mapper, seed, sampling_seeds=bool(cfg.SOLVER.get("RANK_INVARIANT", False))
        ),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_list_collate,
        persistent_workers=workers > 0,
    )
