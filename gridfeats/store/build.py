"""Write one complete store file, atomically: the single place that creates store files.

Part files, the consolidated output and merged shards are all produced by :func:`write_store`. It
writes everything into a temporary file next to the target, flushes and fsyncs it, and only then
``os.replace``-s it over the target and fsyncs the directory. A reader (or a crash) therefore sees
either the old file or the complete new one, never a half-written HDF5 file: the property that plain
appends to an open h5py file cannot give.

Rows are copied in large contiguous slices (consecutive images from the same source are coalesced),
so consolidating many part files costs one sequential pass.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

import h5py
import numpy as np

from gridfeats.store import _crashpoints
from gridfeats.store.layout import (
    COMPRESSIONS,
    STRING_DTYPE,
    StoreMetadata,
    hw_fields,
    row_specs,
)

# Largest block of rows copied at once; bounds memory while consolidating big stores.
_COPY_BLOCK_BYTES = 64 << 20
# Upper bound of one chunk of rows/*: small enough to read one image without decompressing much.
_MAX_CHUNK_BYTES = 1 << 20


class RowSource(Protocol):
    """Where an image's rows come from: an open store file or an in-memory buffer."""

    def read_rows(self, field: str, start: int, stop: int) -> np.ndarray: ...


class H5RowSource:
    """Rows of an open store file."""

    def __init__(self, f: h5py.File):
        self.file = f

    def read_rows(self, field: str, start: int, stop: int) -> np.ndarray:
        return self.file[f"rows/{field}"][start:stop]


class ArrayRowSource:
    """Rows held in memory as one concatenated array per field."""

    def __init__(self, arrays: Dict[str, np.ndarray]):
        self.arrays = arrays

    def read_rows(self, field: str, start: int, stop: int) -> np.ndarray:
        return self.arrays[field][start:stop]


@dataclass
class ImageEntry:
    """One image to write: its index values and where its rows are."""

    image_id: str
    count: int
    hw: Dict[str, np.ndarray]  # image_hw, input_hw (+ grid_hw)
    source: RowSource
    start: int


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name_for(path: str) -> str:
    """A unique temporary name in the target's directory (so ``os.replace`` is a rename)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def choose_chunk_rows(total_rows: int, num_images: int, row_bytes: int) -> int:
    """Rows per chunk: about four images' rows, capped at a few MiB per chunk."""
    mean_count = max(1, total_rows // max(1, num_images))
    cap = max(1, _MAX_CHUNK_BYTES // max(1, row_bytes))
    return max(1, min(total_rows, 4 * mean_count, cap))


def write_store(
    path: str,
    meta: StoreMetadata,
    entries: Sequence[ImageEntry],
    errors: Sequence[Tuple[str, str]],
    compression: str = "gzip",
    crash_label: str = "store",
) -> None:
    """Create (or atomically replace) the store file ``path`` holding ``entries`` and ``errors``."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    tmp = temp_name_for(path)
    try:
        with h5py.File(tmp, "w", rdcc_nbytes=32 << 20) as f:
            for key, value in meta.to_attrs().items():
                f.attrs[key] = value
            _write_index(f, meta, entries)
            _write_rows(f, meta, entries, compression)
            _write_errors(f, errors)
            f.flush()
            _crashpoints.hit(f"{crash_label}:mid-write")
        _fsync_file(tmp)
        _crashpoints.hit(f"{crash_label}:before-rename")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    _crashpoints.hit(f"{crash_label}:after-rename")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index(f: h5py.File, meta: StoreMetadata, entries: Sequence[ImageEntry]) -> None:
    n = len(entries)
    counts = np.array([e.count for e in entries], dtype=np.int32)
    offsets = np.zeros(n, dtype=np.int64)
    if n:
        offsets[1:] = np.cumsum(counts[:-1], dtype=np.int64)
    ids = np.array([e.image_id for e in entries], dtype=object)
    f.create_dataset("index/image_id", shape=(n,), dtype=STRING_DTYPE, data=ids if n else None)
    f.create_dataset("index/offset", data=offsets)
    f.create_dataset("index/count", data=counts)
    for name in hw_fields(meta.mode):
        values = np.array([e.hw[name] for e in entries], dtype=np.int32).reshape(n, 2)
        f.create_dataset(f"index/{name}", data=values)


def _write_errors(f: h5py.File, errors: Sequence[Tuple[str, str]]) -> None:
    e = len(errors)
    ids = np.array([i for i, _ in errors], dtype=object)
    reasons = np.array([r for _, r in errors], dtype=object)
    f.create_dataset("errors/image_id", shape=(e,), dtype=STRING_DTYPE, data=ids if e else None)
    f.create_dataset("errors/reason", shape=(e,), dtype=STRING_DTYPE, data=reasons if e else None)


def _compression_kwargs(compression: str) -> Dict[str, object]:
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


def _write_rows(
    f: h5py.File, meta: StoreMetadata, entries: Sequence[ImageEntry], compression: str
) -> None:
    specs = row_specs(meta)
    total = int(sum(e.count for e in entries))
    row_bytes = sum(
        dtype.itemsize * int(np.prod(trailing, dtype=np.int64))
        for dtype, trailing in specs.values()
    )
    datasets = {}
    for field, (dtype, trailing) in specs.items():
        kwargs: Dict[str, object] = {}
        if total:
            feature_row_bytes = dtype.itemsize * int(np.prod(trailing, dtype=np.int64)) or 1
            rows = choose_chunk_rows(total, len(entries), feature_row_bytes)
            kwargs = {"chunks": (rows, *trailing), **_compression_kwargs(compression)}
        datasets[field] = f.create_dataset(
            f"rows/{field}", shape=(total, *trailing), dtype=dtype, **kwargs
        )
    block_rows = max(1, _COPY_BLOCK_BYTES // max(1, row_bytes))
    out = 0
    for source, start, stop in _coalesced_runs(entries):
        for a in range(start, stop, block_rows):
            b = min(stop, a + block_rows)
            for field, dset in datasets.items():
                dset[out : out + (b - a)] = source.read_rows(field, a, b)
            out += b - a
    assert out == total


def _coalesced_runs(entries: Iterable[ImageEntry]) -> List[Tuple[RowSource, int, int]]:
    """Merge consecutive entries whose rows are adjacent in the same source into single slices."""
    runs: List[Tuple[RowSource, int, int]] = []
    current: Optional[List] = None
    for e in entries:
        if e.count == 0:
            continue
        if current is not None and current[0] is e.source and current[2] == e.start:
            current[2] = e.start + e.count
        else:
            if current is not None:
                runs.append(tuple(current))
            current = [e.source, e.start, e.start + e.count]
    if current is not None:
        runs.append(tuple(current))
    return runs
