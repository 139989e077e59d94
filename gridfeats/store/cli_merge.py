"""``gridfeats merge OUT.h5 SHARD.h5...``: combine shard stores into one feature store."""

from __future__ import annotations

import argparse
import sys

from gridfeats.store.layout import COMPRESSIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="merged store to write (must not exist unless --overwrite)")
    parser.add_argument(
        "shards", nargs="+", help="shard store files, in the order their images should appear"
    )
    parser.add_argument(
        "--compression", choices=COMPRESSIONS, default="gzip", help="codec of the output rows"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    from gridfeats.store.errors import StoreError
    from gridfeats.store.merge import merge_stores
    from gridfeats.store.reader import FeatureStore

    try:
        merge_stores(
            args.output, args.shards, compression=args.compression, overwrite=args.overwrite
        )
        store = FeatureStore(args.output)
    except (StoreError, OSError) as exc:
        print(f"gridfeats merge: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"merged {len(args.shards)} shards into {args.output}: {len(store)} images, "
        f"{len(store.errors)} errors"
    )
    return 0
