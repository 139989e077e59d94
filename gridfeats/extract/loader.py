"""Decode and resize images in DataLoader workers, turning every failure into a record.

Decoding a JPEG and resizing it to 600x1000 costs about as much CPU time as a small part of the
forward pass, so it runs in worker processes that overlap the model. A bad file must not stop a
run over 100k images: :class:`ImageDataset` never raises for an image; it returns a
:class:`FailedImage` carrying the reader's specific reason, and the job records it in ``errors/``.

Order is deterministic (no shuffling; the DataLoader returns batches in index order whatever the
number of workers), so results and the store's index order do not depend on ``--workers``.

Workers are forked (cheap: no re-import of torch) where the platform can fork. A forked worker
inherits every open file descriptor, including the store writer's ``flock``-ed lock file; a
worker that outlives a killed parent by a few seconds would then keep the output locked and make
the immediate re-run fail as "busy". So each worker closes its copies of the descriptors named in
``close_in_workers`` first thing (the parent's lock is unaffected: it holds its own descriptor).
The job also starts the workers before its writer thread, so no lock is held mid-operation at
fork time.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from gridfeats.data.image_io import DEFAULT_MAX_PIXELS, ImageReadError
from gridfeats.data.preprocess import PreparedImage, prepare_image
from gridfeats.extract.sources import ImageItem


@dataclass(frozen=True)
class InputSpec:
    """How images are resized for the network (the config's ``INPUT.*`` test settings)."""

    min_size: int
    max_size: int
    input_format: str = "BGR"
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS

    @classmethod
    def from_cfg(cls, cfg, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> "InputSpec":
        return cls(
            int(cfg.INPUT.MIN_SIZE_TEST),
            int(cfg.INPUT.MAX_SIZE_TEST),
            str(cfg.INPUT.FORMAT),
            max_pixels,
        )


@dataclass
class LoadedImage:
    """An image ready for the model."""

    image_id: str
    prepared: PreparedImage


@dataclass
class FailedImage:
    """An unreadable input; ``reason`` is short and specific (e.g. ``truncated image``)."""

    image_id: str
    reason: str


Loaded = Union[LoadedImage, FailedImage]


def load_image(item: ImageItem, spec: InputSpec) -> Loaded:
    """Read and resize one image; any failure becomes a :class:`FailedImage`, never an exception."""
    try:
        prepared = prepare_image(
            item.path, spec.min_size, spec.max_size, spec.input_format, spec.max_pixels
        )
    except ImageReadError as exc:
        return FailedImage(item.image_id, exc.reason)
    except MemoryError:
        return FailedImage(item.image_id, "out of memory while decoding")
    except Exception as exc:  # an unforeseen decoder failure must cost one image, not the run
        return FailedImage(item.image_id, f"unexpected decode error: {type(exc).__name__}: {exc}")
    return LoadedImage(item.image_id, prepared)


class ImageDataset(Dataset):
    """``dataset[i]`` is the :data:`Loaded` record of ``items[i]``."""

    def __init__(self, items: Sequence[ImageItem], spec: InputSpec):
        self.items = list(items)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        return load_image(self.items[index], self.spec)


def _keep_as_list(batch: List[Loaded]) -> List[Loaded]:
    """Images differ in size, so a batch stays a list (the model groups same-size images itself)."""
    return batch


def _init_worker(close_paths: Sequence[str], _worker_id: int) -> None:
    for path in close_paths:
        _close_descriptors_of(path)
    # Decoding is single-threaded PIL work; extra torch threads per worker would only compete
    # with the model's threads.
    torch.set_num_threads(1)


def _close_descriptors_of(path: str) -> None:
    """Close this process's descriptors open on ``path`` (Linux /proc; a no-op elsewhere)."""
    target = os.path.realpath(path)
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in fds:
        try:
            if os.path.realpath(os.readlink(f"/proc/self/fd/{name}")) == target:
                os.close(int(name))
        except OSError:
            continue


def _worker_context() -> Optional[multiprocessing.context.BaseContext]:
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None  # the platform default (spawn on Windows/macOS)


def make_loader(
    items: Sequence[ImageItem],
    spec: InputSpec,
    batch_size: int = 1,
    workers: int = 0,
    close_in_workers: Sequence[str] = (),
) -> DataLoader:
    """A DataLoader yielding lists of up to ``batch_size`` :data:`Loaded` records, in input order.

    ``close_in_workers``: files (e.g. the writer's lock) whose inherited descriptors workers close.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"the number of workers cannot be negative, got {workers}")
    extra = {}
    if workers > 0:
        extra = {
            "multiprocessing_context": _worker_context(),
            "prefetch_factor": 4,
            "worker_init_fn": functools.partial(_init_worker, tuple(close_in_workers)),
        }
    return DataLoader(
        ImageDataset(items, spec),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_keep_as_list,
        **extra,
    )
