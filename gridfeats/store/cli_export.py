"""``gridfeats export --format FMT STORE.h5 OUTDIR``: write a store in another project's layout."""

from __future__ import annotations

import argparse
import sys

from gridfeats.store.export import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", required=True, choices=tuple(FORMATS), dest="fmt", help="target layout"
    )
    parser.add_argument("store", help="feature store file (.h5)")
    parser.add_argument("outdir", help="folder to write into (created if missing)")
    parser.add_argument(
        "--name-format",
        default="{image_id}",
        help="file name template per image: fields image_id (extension removed), basename, number "
        "(numeric ids), e.g. 'COCO_val2014_{number:012d}' (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from gridfeats.store.errors import StoreError
    from gridfeats.store.export import export_store

    try:
        report = export_store(args.store, args.outdir, args.fmt, name_format=args.name_format)
    except (StoreError, OSError) as exc:
        print(f"gridfeats export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {report.written} images as {args.fmt} to {', '.join(report.outputs)}")
    for image_id, reason in report.skipped:
        print(f"skipped {image_id}: {reason}", file=sys.stderr)
    return 0
