"""Gather the images of several store files into one list of entries to write.

Used twice: to consolidate a run's part files into its output, and to merge shard files. Both need
the same rules, kept here once:

* every file must have compatible metadata (:data:`~gridfeats.store.layout.COMPATIBILITY_FIELDS`);
* an image id with features in several files is kept once, from the first file (in the given
  order); with ``check_duplicates`` its rows must be equal in every file, else
  :class:`MergeConflictError` (shards that disagree mean different inputs or weights);
* an image that has features anywhere is not listed as an error (a retry succeeded); an id listed
  as an error in several files keeps its first position and its last reason (the latest attempt).

Only one source file is open at a time while rows are copied, so a run with thousands of parts
does not run out of file handles.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from gridfeats.store.build import ImageEntry
from gridfeats.store.errors import MergeConflictError, StoreMismatchError
from gridfeats.store.layout import (
    StoreMetadata,
    open_store_file,
    read_errors,
    read_index,
    row_fields,
)


class OneOpenFile:
    """Keeps at most one of many store files open; sources reopen theirs on demand."""

    def __init__(self) -> None:
        self._path: Optional[str] = None
        self._file: Optional[h5py.File] = None

    def get(self, path: str) -> h5py.File:
        if self._path != path:
            self.close()
            self._file = open_store_file(path, rdcc_nbytes=32 << 20)
            self._path = path
        assert self._file is not None
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._path = None, None


class FileRowSource:
    """Rows of one store file, opened through a shared :class:`OneOpenFile`."""

    def __init__(self, path: str, opener: OneOpenFile):
        self.path = path
        self.opener = opener

    def read_rows(self, field: str, start: int, stop: int) -> np.ndarray:
        return self.opener.get(self.path)[f"rows/{field}"][start:stop]


class Collected:
    """The result of :func:`collect`: metadata, entries and errors; close it after writing."""

    def __init__(
        self,
        meta: StoreMetadata,
        entries: List[ImageEntry],
        errors: List[Tuple[str, str]],
        opener: OneOpenFile,
    ):
        self.meta = meta
        self.entries = entries
        self.errors = errors
        self._opener = opener

    def close(self) -> None:
        self._opener.close()

    def __enter__(self) -> "Collected":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(
    paths: Sequence[str],
    expected: Optional[StoreMetadata] = None,
    check_duplicates: bool = False,
) -> Collected:
    """Read the indexes of ``paths`` (in order) and plan the combined store."""
    opener = OneOpenFile()
    meta = expected
    entries: List[ImageEntry] = []
    where: Dict[str, Tuple[str, int]] = {}  # image id -> (path, position in entries)
    error_reason: Dict[str, str] = {}
    try:
        for path in paths:
            f = opener.get(path)
            file_meta = StoreMetadata.from_file(f)
            if meta is None:
                meta = file_meta
            problems = meta.mismatches(file_meta)
            if problems:
                raise StoreMismatchError(
                    f"{path} was written with different metadata than "
                    f"{paths[0] if expected is None else 'this run'}: " + "; ".join(problems)
                )
            index = read_index(f, meta.mode)
            file_errors = read_errors(f)  # read now: duplicate checks below may close f
            source = FileRowSource(path, opener)
            for i, image_id in enumerate(index.image_ids):
                entry = ImageEntry(
                    image_id=image_id,
                    count=int(index.count[i]),
                    hw={name: arr[i] for name, arr in index.hw.items()},
                    source=source,
                    start=int(index.offset[i]),
                )
                if image_id in where:
                    if check_duplicates:
                        first_path, pos = where[image_id]
                        _require_equal(meta, entries[pos], entry, first_path, path)
                    continue
                where[image_id] = (path, len(entries))
                entries.append(entry)
            for image_id, reason in file_errors:
                error_reason[image_id] = (
                    reason  # dict keeps the first position, takes the last reason
                )
        errors = [(i, r) for i, r in error_reason.items() if i not in where]
    except BaseException:
        opener.close()
        raise
    if meta is None:
        raise ValueError("no store files given")
    return Collected(meta, entries, errors, opener)


def _require_equal(
    meta: StoreMetadata, a: ImageEntry, b: ImageEntry, path_a: str, path_b: str
) -> None:
    same = a.count == b.count and all(np.array_equal(a.hw[k], b.hw[k]) for k in a.hw)
    if same:
        for field in row_fields(meta.mode):
            rows_a = a.source.read_rows(field, a.start, a.start + a.count)
            rows_b = b.source.read_rows(field, b.start, b.start + b.count)
            if not np.array_equal(rows_a, rows_b):
                same = False
                break
    if not same:
        raise MergeConflictError(
            f"image {a.image_id!r} is in {os.path.basename(path_a)} and {os.path.basename(path_b)} "
            "with different values (were the shards made from different inputs, weights or "
            "configs?)"
        )
