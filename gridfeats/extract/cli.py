"""``gridfeats extract``: batch feature extraction into one HDF5 feature store (docs/extract.md).

Exit codes: 0 every input stored; 1 some inputs failed (listed in the output's ``errors/`` and
the summary), ``--strict`` stopped at one, or an I/O error (full disk...) stopped the run; 2 bad
usage (arguments, config, weights, input listing, an output made with other settings); 130
interrupted. Finished work is always kept: re-run the same command to resume.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from typing import Optional, Tuple

from gridfeats.data.image_io import DEFAULT_MAX_PIXELS
from gridfeats.extract.job import ExtractOptions
from gridfeats.features import BOX_SOURCES, REGION_RULES, BottomUpSettings
from gridfeats.precision import PRECISIONS
from gridfeats.store.layout import COMPRESSIONS, MODES, STORAGE_DTYPES

# Defaults come from the options and settings objects themselves, so the CLI cannot drift from them.
_RUN = ExtractOptions(input="", output="")
_BOTTOM_UP = BottomUpSettings()

_SHARD = re.compile(r"^(\d+)/(\d+)$")
_POOL = re.compile(r"^(\d+)[xX](\d+)$")


def _shard(text: str) -> Tuple[int, int]:
    match = _SHARD.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise argparse.ArgumentTypeError(f"shard {text} is invalid: need 0 <= i < n")
    return index, count


def _pool(text: str) -> Tuple[int, int]:
    match = _POOL.match(text.strip())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected HxW with positive sizes (e.g. 7x7), got {text!r}"
        )
    return int(match.group(1)), int(match.group(2))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--config",
        required=True,
        help="detector config: a YAML path or a shipped name (R-50-grid, X-152-grid...)",
    )
    io.add_argument(
        "--weights",
        help="checkpoint (.pth/.pkl); without it the detector keeps a seeded random init",
    )
    io.add_argument(
        "--input",
        required=True,
        help="a folder of images (recursive), a COCO-format json, or a text file of paths",
    )
    io.add_argument(
        "--image-root",
        help="folder the json's file names / the list's relative paths are relative to",
    )
    io.add_argument(
        "--output", required=True, help="the HDF5 feature store to write (resumed if it exists)"
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an existing output (and its unfinished run) first",
    )

    what = parser.add_argument_group("features")
    what.add_argument(
        "--mode",
        choices=MODES,
        default=_RUN.mode,
        help="grid (C5 map) or region features",
    )
    what.add_argument(
        "--grid-pool", type=_pool, metavar="HxW", help="grid mode: average-pool every grid to HxW"
    )
    what.add_argument(
        "--regions",
        choices=REGION_RULES,
        default=_RUN.regions,
        help="region selection: Detectron2's inference or bottom-up-attention's rule",
    )
    what.add_argument(
        "--bottom-up-thresh",
        type=float,
        default=_BOTTOM_UP.score_thresh,
        help="bottom-up: keep boxes whose best class score >= this",
    )
    what.add_argument(
        "--min-boxes",
        type=_positive,
        default=_BOTTOM_UP.min_boxes,
        help="bottom-up: at least this many boxes",
    )
    what.add_argument(
        "--max-boxes",
        type=_positive,
        default=_BOTTOM_UP.max_boxes,
        help="bottom-up: at most this many boxes",
    )
    what.add_argument(
        "--num-boxes",
        type=_positive,
        help="bottom-up: exactly this many boxes (e.g. 36); sets min = max",
    )
    what.add_argument(
        "--bottom-up-nms",
        type=float,
        default=_BOTTOM_UP.nms_thresh,
        help="bottom-up: per-class NMS IoU threshold",
    )
    what.add_argument(
        "--bottom-up-boxes",
        choices=BOX_SOURCES,
        default=_BOTTOM_UP.boxes,
        help=(
            "bottom-up: NMS on and store the proposals (generate_tsv.py) or the regressed class "
            "boxes"
        ),
    )
    what.add_argument(
        "--attr-topk",
        type=_non_negative,
        default=_RUN.attr_topk,
        help="region mode: top-K attributes stored per box",
    )

    run = parser.add_argument_group("running")
    run.add_argument(
        "--batch-size",
        type=_positive,
        default=_RUN.batch_size,
        help="images per batch handed to the model",
    )
    run.add_argument(
        "--workers",
        type=_non_negative,
        default=_RUN.workers,
        help="DataLoader processes decoding and resizing",
    )
    run.add_argument(
        "--device",
        default=_RUN.device,
        help="cpu, cuda, cuda:1... (under torchrun, cuda means cuda:LOCAL_RANK)",
    )
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_RUN.precision,
        help="fp32 (exact), bf16 (GPU, or CPU with native bf16), fp16 (GPU)",
    )
    run.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default=_RUN.dtype,
        help="storage dtype of the features",
    )
    run.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=_RUN.compression,
        help="compression of the output rows",
    )
    run.add_argument(
        "--shard",
        type=_shard,
        default=(_RUN.shard_index, _RUN.shard_count),
        metavar="i/n",
        help="extract only shard i of n (every n-th image) into OUT.shard-i-of-n.h5",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first input that fails instead of recording it",
    )
    run.add_argument(
        "--retry-errors", action="store_true", help="when resuming, retry inputs that failed before"
    )
    run.add_argument(
        "--max-pixels",
        type=_non_negative,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels than this (decompression-bomb guard; 0 = no limit)",
    )
    run.add_argument(
        "--exact-kernels",
        action="store_true",
        help=(
            "do not fold frozen norms into convolutions nor run channels-last (slower; "
            "Detectron2's exact fp32 numbers)"
        ),
    )
    run.add_argument(
        "--batched-forward",
        action="store_true",
        help=(
            "one forward per batch instead of per image (faster on GPUs; rows then depend on the "
            "batch size by float rounding)"
        ),
    )
    run.add_argument(
        "--commit-every",
        type=_positive,
        default=_RUN.commit_every,
        help="images per committed part (work a kill can lose)",
    )
    run.add_argument(
        "--threads", type=_positive, help="torch intra-op threads (default: torch's choice)"
    )
    run.add_argument(
        "--seed",
        type=int,
        default=_RUN.seed,
        help="seed of the random initialisation when no --weights are given",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. INPUT.MIN_SIZE_TEST 800 MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.2",
    )


def options_from_args(args: argparse.Namespace):
    """Turn parsed arguments into :class:`~gridfeats.extract.job.ExtractOptions`."""
    min_boxes, max_boxes = (
        (args.num_boxes, args.num_boxes) if args.num_boxes else (args.min_boxes, args.max_boxes)
    )
    bottom_up = BottomUpSettings(
        args.bottom_up_thresh, min_boxes, max_boxes, args.bottom_up_nms, args.bottom_up_boxes
    )
    if len(args.opts) % 2:
        raise ValueError(
            f"config overrides come in KEY VALUE pairs, got {len(args.opts)} words: "
            f"{' '.join(args.opts)}"
        )
    return ExtractOptions(
        input=args.input,
        output=args.output,
        config=args.config,
        opts=list(args.opts),
        weights=args.weights,
        image_root=args.image_root,
        mode=args.mode,
        regions=args.regions,
        bottom_up=bottom_up,
        attr_topk=args.attr_topk,
        grid_pool=args.grid_pool,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        dtype=args.dtype,
        compression=args.compression,
        shard_index=args.shard[0],
        shard_count=args.shard[1],
        strict=args.strict,
        retry_errors=args.retry_errors,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels or None,
        fast_kernels=not args.exact_kernels,
        batched_forward=args.batched_forward,
        commit_every=args.commit_every,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
    )


def _raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from gridfeats.engine.distributed import RankInfo
    from gridfeats.extract.job import ExtractError, StrictStop, run_extraction
    from gridfeats.extract.sources import SourceError
    from gridfeats.precision import PrecisionError
    from gridfeats.store.errors import StoreError

    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"gridfeats extract: error: {exc}", file=sys.stderr)
        return 2
    if options.weights is None:
        print(
            "gridfeats extract: no --weights given: the detector uses a seeded random "
            f"initialisation (seed {options.seed}); the features are not meaningful",
            file=sys.stderr,
        )
    previous = _install_sigterm()
    try:
        summary = run_extraction(options)
    except StrictStop as exc:
        print(
            f"gridfeats extract: {exc}. Finished work is kept; fix or remove the input and re-run.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "gridfeats extract: interrupted; finished work is kept. Re-run the same command to "
            "resume.",
            file=sys.stderr,
        )
        return 130
    except (
        SourceError,
        ExtractError,
        StoreError,
        PrecisionError,
    ) as exc:  # all fixable by the user
        print(f"gridfeats extract: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if not isinstance(cause, OSError):
            raise  # a bug, not the environment: keep the traceback
        print(
            f"gridfeats extract: I/O error: {cause}. Finished work is kept; fix the cause and "
            "re-run the same command to resume.",
            file=sys.stderr,
        )
        return 1
    finally:
        _restore_sigterm(previous)
    if not RankInfo.from_env().is_main:
        return 0  # rank 0 reports for everyone; a non-zero code here would stop its merge
    print(summary.format())
    return 1 if summary.errors else 0


def _install_sigterm() -> Optional[object]:
    """SIGTERM (torchrun stopping workers, a scheduler's limit) commits done work like Ctrl-C."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(previous: Optional[object]) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
