"""Merge shard stores into one file with the standard layout (a copy, not virtual datasets).

Shards must share their metadata (mode, dims, dtype, config, weights). Images come out in the order
of the shard files as given, each shard in its own commit order; an image found in two shards is
kept once if its values are identical there and is an error otherwise (see
:mod:`gridfeats.store.collect` for the exact rules). The output is written atomically.
"""

from __future__ import annotations

import os
from typing import Sequence

from gridfeats.store.build import write_store
from gridfeats.store.collect import collect
from gridfeats.store.errors import StoreError
from gridfeats.store.layout import COMPRESSIONS


def merge_stores(
    out_path: str, shard_paths: Sequence[str], compression: str = "gzip", overwrite: bool = False
) -> None:
    """Write ``out_path`` holding every image and error of ``shard_paths``."""
    if not shard_paths:
        raise StoreError("merge needs at least one shard file")
    if compression not in COMPRESSIONS:
        raise StoreError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    out_abs = os.path.abspath(out_path)
    shards = [os.path.abspath(p) for p in shard_paths]
    if out_abs in shards:
        raise StoreError(
            f"the output {out_path} is also one of the shards; choose another output path"
        )
    if len(set(shards)) != len(shards):
        raise StoreError("a shard file is listed twice")
    for shard in shards:
        if os.path.isdir(shard + ".parts"):
            raise StoreError(
                f"shard {shard} has an unfinished run ({shard}.parts exists); finish it first"
            )
        if not os.path.exists(shard):
            raise StoreError(f"shard not found: {shard}")
    if os.path.exists(out_abs) and not overwrite:
        raise StoreError(f"{out_path} already exists; remove it or pass overwrite")
    os.makedirs(os.path.dirname(out_abs), exist_ok=True)
    with collect(shards, check_duplicates=True) as plan:
        write_store(out_abs, plan.meta, plan.entries, plan.errors, compression, crash_label="merge")
