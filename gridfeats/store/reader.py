"""FeatureStore: read a feature store by image id, also inside DataLoader workers.

The index (ids, offsets, counts, sizes) and the errors are loaded once when the store is created,
into a dict, so lookups never scan the file. The HDF5 handle itself is opened lazily and tied to
the process id: an h5py handle must not be used across ``fork``, so a worker that inherits (or
unpickles) a store opens its own handle on first access. Pickling drops the handle.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import h5py
import numpy as np

from gridfeats.store.errors import StaleFeatureLayoutWarning, StoreError, StoreIncompleteError
from gridfeats.store.layout import (
    FEATURE_LAYOUT,
    StoreIndex,
    StoreMetadata,
    open_store_file,
    read_errors,
    read_index,
    row_fields,
)
from gridfeats.store.records import grid_rows_to_map


class FeatureStore:
    """Read-only access to a feature store file.

    ``len(store)``, ``image_id in store``, ``iter(store)`` (ids in index order) and
    ``store[image_id]`` -> dict of numpy arrays: ``features [count, D]`` (stored dtype),
    ``image_hw``, ``input_hw``, plus ``grid_hw`` (grid mode) or ``boxes``, ``scores``, ``classes``,
    ``attr_ids``, ``attr_scores`` (region mode). Integer ids are accepted as their decimal text.
    """

    def __init__(self, path: str, cache_bytes: int = 16 << 20):
        self.path = os.path.abspath(path)
        self._cache_bytes = int(cache_bytes)
        parts_dir = self.path + ".parts"
        if not os.path.exists(self.path) and os.path.isdir(parts_dir):
            raise StoreIncompleteError(
                f"{path} is not finished: its run left committed parts in {parts_dir}. Re-run the "
                "same extraction command to finish it (or wait if it is still running)."
            )
        if os.path.isdir(parts_dir):
            warnings.warn(
                f"{parts_dir} exists: a run into {path} is unfinished; this file holds only what "
                "was consolidated before it started",
                RuntimeWarning,
                stacklevel=2,
            )
        with open_store_file(self.path) as f:
            self._identity = _file_identity(self.path)
            self.meta: StoreMetadata = StoreMetadata.from_file(f)
            if self.meta.mode == "region" and self.meta.feature_layout < FEATURE_LAYOUT:
                warnings.warn(
                    f"{path} was written by an earlier gridfeats (feature layout "
                    f"{self.meta.feature_layout}): if its regions came from the detectron2 rule, "
                    "their features and attributes were pooled at misaligned boxes; re-extract "
                    "it (gridfeats extract ... --overwrite)",
                    StaleFeatureLayoutWarning,
                    stacklevel=2,
                )
            self.attrs: Dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
            self._index: StoreIndex = read_index(f, self.meta.mode)
            self.errors: List[Tuple[str, str]] = read_errors(f)
        self._position: Dict[str, int] = {
            image_id: i for i, image_id in enumerate(self._index.image_ids)
        }
        self._file: Optional[h5py.File] = None
        self._pid: Optional[int] = None

    # --- metadata ---------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.meta.mode

    @property
    def feature_dim(self) -> int:
        return self.meta.feature_dim

    @property
    def ids(self) -> List[str]:
        """Image ids in index (commit) order."""
        return list(self._index.image_ids)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return _key(image_id) in self._position

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._index.image_ids))

    def count(self, image_id: Any) -> int:
        """Number of rows of an image (grid cells or boxes) without reading them."""
        return int(self._index.count[self._locate(image_id)])

    # --- data -------------------------------------------------------------------------------------
    def __getitem__(self, image_id: Any) -> Dict[str, np.ndarray]:
        i = self._locate(image_id)
        start = int(self._index.offset[i])
        stop = start + int(self._index.count[i])
        f = self._handle()
        item = {field: f[f"rows/{field}"][start:stop] for field in row_fields(self.meta.mode)}
        for name, values in self._index.hw.items():
            item[name] = values[i].copy()
        return item

    def grid(self, image_id: Any, dtype: Optional[np.dtype] = None) -> np.ndarray:
        """A grid image's features as a ``[D, h, w]`` map (optionally cast, e.g. to float32)."""
        if self.meta.mode != "grid":
            raise ValueError(f"{self.path} is a {self.meta.mode} store; grid() needs a grid store")
        item = self[image_id]
        fmap = grid_rows_to_map(item["features"], item["grid_hw"])
        return fmap if dtype is None else fmap.astype(dtype, copy=False)

    # --- handle management ------------------------------------------------------------------------
    def _locate(self, image_id: Any) -> int:
        key = _key(image_id)
        try:
            return self._position[key]
        except KeyError:
            raise KeyError(f"image id {key!r} is not in {self.path}") from None

    def _handle(self) -> h5py.File:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            # A handle inherited through fork belongs to the parent: never touch it here.
            if _file_identity(self.path) != self._identity:
                # The index in memory describes the old file; reading the new one with it would
                # return other images' rows.
                raise StoreError(
                    f"{self.path} was replaced after this FeatureStore loaded its index (a run "
                    "finished or extended it); create a new FeatureStore"
                )
            self._file = open_store_file(self.path, rdcc_nbytes=self._cache_bytes)
            self._pid = pid
        return self._file

    def close(self) -> None:
        """Close this process's handle (a later access reopens it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def __repr__(self) -> str:
        return (
            f"FeatureStore({self.path!r}, mode={self.meta.mode}, images={len(self)}, "
            f"errors={len(self.errors)})"
        )


def _file_identity(path: str) -> Tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _key(image_id: Any) -> str:
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        return str(int(image_id))
    if isinstance(image_id, bytes):
        return image_id.decode("utf-8")
    return str(image_id)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
