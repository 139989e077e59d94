"""File names of shard and rank outputs, and rank 0's final merge of a torchrun job.

* ``--shard i/n`` (n > 1) writes ``OUT.shard-i-of-n.h5`` beside ``OUT.h5``, so shards started on
  different machines into one shared folder can never collide; ``gridfeats merge OUT.h5
  OUT.shard-*-of-n.h5`` joins them when all are done.
* Under torchrun each rank writes ``T.rank-r-of-w.h5`` beside its target ``T`` (``OUT.h5`` or the
  shard file); rank 0 merges the rank files into ``T`` and deletes them.

The merge is crash-safe like everything else in the store: it writes a temporary file,
atomically replaces the target, and only then deletes the rank files. A kill before the replace
leaves the old target and the rank files; a kill after it leaves rank files whose images the new
target already holds, which the next merge accepts (an image found twice with identical values is
kept once). When the target already exists (a resumed or extended run), it is merged first so its
images keep their positions.
"""

from __future__ import annotations

import glob
import os
from typing import List, Sequence

from gridfeats.store.build import fsync_dir
from gridfeats.store.merge import merge_stores
from gridfeats.store.reader import FeatureStore


def _with_suffix(path: str, suffix: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.{suffix}{ext or '.h5'}"


def shard_output_path(output: str, index: int, count: int) -> str:
    """The file shard ``index`` of ``count`` writes (``output`` itself when there is one shard)."""
    return output if count == 1 else _with_suffix(output, f"shard-{index}-of-{count}")


def rank_output_path(target: str, rank: int, world_size: int) -> str:
    """The file one torchrun rank writes before rank 0 merges it into ``target``."""
    return _with_suffix(target, f"rank-{rank}-of-{world_size}")


def merge_rank_files(target: str, rank_files: Sequence[str], compression: str) -> bool:
    """Merge finished rank files (and an existing ``target``) into ``target``; delete the rank
    files.

    Returns False when there was nothing new to merge (every rank file empty and the target
    present), in which case the target is left untouched.
    """
    present = [p for p in rank_files if os.path.exists(p)]
    if os.path.exists(target) and not any(_has_content(p) for p in present):
        _remove(present)
        return False
    sources: List[str] = ([target] if os.path.exists(target) else []) + present
    temporary = _with_suffix(target, "merging")
    _remove(
        glob.glob(
            os.path.join(
                os.path.dirname(os.path.abspath(temporary)), f".{os.path.basename(temporary)}.tmp-*"
            )
        )
    )
    merge_stores(temporary, sources, compression=compression, overwrite=True)
    os.replace(temporary, target)
    fsync_dir(os.path.dirname(os.path.abspath(target)))
    _remove(present)
    return True


def _has_content(path: str) -> bool:
    store = FeatureStore(path)
    return len(store) > 0 or len(store.errors) > 0


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
