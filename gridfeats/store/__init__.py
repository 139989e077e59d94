"""The HDF5 feature store (layout: docs/feature-store.md).

Writing (crash-safe, resumable; see :mod:`gridfeats.store.writer` for the commit protocol)::

    meta = StoreMetadata(mode="grid", feature_dim=2048, config=cfg.dump(), weights_sha256=digest,
                         dtype="float16")
    with FeatureWriter("out.h5", meta, compression="gzip") as writer:
        todo = [i for i in ids if i not in writer.done_ids()]
        for image_id in todo:
            # or writer.add_error(image_id, reason)
            writer.add(image_id, grid_record(feature_map, image_hw, input_hw))

Reading::

    store = FeatureStore("out.h5")
    item = store["139"]          # dict of numpy arrays; store.grid("139") -> [D, h, w]

Also: :func:`merge_stores` (shards -> one file) and :mod:`gridfeats.store.export` (other layouts).
"""

from gridfeats.store.async_writer import AsyncFeatureWriter
from gridfeats.store.errors import (
    MergeConflictError,
    StoreBusyError,
    StoreError,
    StoreFormatError,
    StoreIncompleteError,
    StoreMismatchError,
)
from gridfeats.store.layout import (
    COMPRESSIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    STORAGE_DTYPES,
    StoreMetadata,
)
from gridfeats.store.merge import merge_stores
from gridfeats.store.reader import FeatureStore
from gridfeats.store.records import grid_map_to_rows, grid_record, grid_rows_to_map, region_record
from gridfeats.store.writer import FeatureWriter

__all__ = [
    "AsyncFeatureWriter",
    "COMPRESSIONS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FeatureStore",
    "FeatureWriter",
    "MergeConflictError",
    "STORAGE_DTYPES",
    "StoreBusyError",
    "StoreError",
    "StoreFormatError",
    "StoreIncompleteError",
    "StoreMetadata",
    "StoreMismatchError",
    "grid_map_to_rows",
    "grid_record",
    "grid_rows_to_map",
    "merge_stores",
    "region_record",
]
