"""``gridfeats convert-backbone SRC --out DST.pth``: an SSL / torchvision / HF backbone -> weights
and a config the detector, ``gridfeats extract`` and the service load.

Exit codes: 0 written, 2 refused (the message says why: no backbone, ambiguous layout, shape
mismatch, a head count that only ``--num-heads`` can give).
"""

from __future__ import annotations

import argparse
import sys

from gridfeats.checkpoint.convert.layouts import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint file, or a local Hugging Face model folder")
    parser.add_argument("--out", required=True, help="DST.pth to write (DST.yaml beside it)")
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="layout of SRC (default: recognise it and say which)",
    )
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads of a ViT, when the file does not record a known architecture",
    )
    parser.add_argument(
        "--base",
        default="R-50-grid",
        help="config the written one builds on (a shipped name or a YAML path; default R-50-grid)",
    )


def run(args: argparse.Namespace) -> int:
    from gridfeats.checkpoint import CheckpointError
    from gridfeats.checkpoint.convert import convert_backbone

    try:
        result = convert_backbone(
            args.source, args.out, fmt=args.format, num_heads=args.num_heads, base=args.base
        )
    except (CheckpointError, OSError) as e:
        print(f"gridfeats convert-backbone: refused: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0
