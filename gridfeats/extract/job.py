"""The extraction run: list inputs, skip what is done, extract the rest into the store, report.

:func:`run_extraction` is what ``gridfeats extract`` calls (and what tests and the demo call
directly). One run, in order:

1. list the input (:mod:`~gridfeats.extract.sources`), keep this shard's and this rank's share;
2. build the detector and the feature maker; describe the run as :class:`StoreMetadata`, whose
   config text also records every extraction setting that changes the rows, so resuming or
   merging with different settings is refused instead of silently mixing features;
3. open the crash-safe :class:`~gridfeats.store.FeatureWriter` on this process's file and skip
   every id it already holds (features or errors): that is the whole resume logic;
4. decode in DataLoader workers, run the model in this process, hand records to a background
   writer thread (:class:`~gridfeats.store.AsyncFeatureWriter`), with a tqdm bar (images/s, ETA);
5. close the writer (consolidate the file); under torchrun, meet the other ranks and let rank 0
   merge the rank files (:mod:`~gridfeats.extract.outputs`);
6. return an :class:`ExtractSummary` of the output file and of this run.

Bad inputs are recorded in ``errors/`` and the run goes on; with ``strict`` the run stops at the
first one instead (committing what was done, not recording the failure, so a re-run stops there
again). Any other exception (including Ctrl-C) commits the finished work before propagating, so
the same command resumes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, TextIO, Tuple

import torch
from tqdm import tqdm

from gridfeats.data.image_io import DEFAULT_MAX_PIXELS
from gridfeats.engine import distributed
from gridfeats.engine.distributed import RankInfo
from gridfeats.errors import GridfeatsError
from gridfeats.extract.loader import FailedImage, InputSpec, make_loader
from gridfeats.extract.outputs import merge_rank_files, rank_output_path, shard_output_path
from gridfeats.extract.sources import ImageItem, list_images, shard_items
from gridfeats.features import (
    REGION_RULES,
    BottomUpSettings,
    FeatureSpec,
    make_feature_maker,
    storage_problem,
)
from gridfeats.store import AsyncFeatureWriter, FeatureStore, FeatureWriter, StoreMetadata
from gridfeats.store.errors import StoreMismatchError
from gridfeats.store.layout import COMPRESSIONS, MODES, STORAGE_DTYPES, open_store_file
from gridfeats.store.writer import parts_dir_for


class ExtractError(GridfeatsError, ValueError):
    """A run that cannot start or go on, for a reason the user can fix (the message says which)."""


class StrictStop(ExtractError):
    """``strict`` mode met a bad input; finished work is committed, the failure is not recorded."""

    def __init__(self, image_id: str, reason: str):
        self.image_id, self.reason = image_id, reason
        super().__init__(f"stopped at the first failure (--strict): {image_id}: {reason}")


@dataclass
class ExtractOptions:
    """Everything a run needs; the CLI fills it from its arguments (see ``docs/extract.md``)."""

    input: str
    output: str
    config: str = "R-50-grid"
    opts: Sequence[str] = ()
    weights: Optional[str] = None
    image_root: Optional[str] = None
    mode: str = "grid"
    regions: str = "detectron2"
    bottom_up: BottomUpSettings = field(default_factory=BottomUpSettings)
    attr_topk: int = 10
    grid_pool: Optional[Tuple[int, int]] = None
    batch_size: int = 1
    workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    dtype: str = "float16"
    compression: str = "gzip"
    shard_index: int = 0
    shard_count: int = 1
    strict: bool = False
    retry_errors: bool = False
    overwrite: bool = False
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    fast_kernels: bool = True
    batched_forward: bool = False
    commit_every: int = 256
    seed: int = 0
    threads: Optional[int] = None
    progress: bool = True
    dist_timeout_s: float = 48 * 3600.0

    def check(self) -> None:
        """Raise :class:`ExtractError` for option values that cannot work together."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.regions not in REGION_RULES:
            problems.append(f"region selection must be one of {REGION_RULES}, got {self.regions!r}")
        if self.dtype not in STORAGE_DTYPES:
            problems.append(f"storage dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            problems.append(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.batch_size < 1:
            problems.append("batch size must be at least 1")
        if self.workers < 0:
            problems.append("workers cannot be negative")
        if self.commit_every < 1:
            problems.append("commit-every must be at least 1")
        if self.attr_topk < 0:
            problems.append("the number of attributes per box cannot be negative")
        if self.shard_count < 1 or not 0 <= self.shard_index < self.shard_count:
            problems.append(
                f"shard {self.shard_index}/{self.shard_count} is invalid: need 0 <= i < n"
            )
        if self.grid_pool is not None and self.mode != "grid":
            problems.append("grid pooling only applies to --mode grid")
        if self.max_pixels is not None and self.max_pixels < 1:
            problems.append("the pixel limit must be positive")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be at least 1")
        if problems:
            raise ExtractError("; ".join(problems))


@dataclass
class RunCounts:
    """What this process did in this run."""

    listed: int = 0
    skipped: int = 0
    processed: int = 0
    failed: int = 0
    rows: int = 0
    seconds: float = 0.0


@dataclass
class ExtractSummary:
    """The closing report: the output file as a whole, and this run's share of it."""

    output: str
    mode: str
    images: int
    errors: int
    rows: int
    bytes: int
    run: RunCounts
    error_sample: List[Tuple[str, str]]
    random_init: bool
    merge_hint: Optional[str] = None

    @property
    def images_per_second(self) -> float:
        return self.run.processed / self.run.seconds if self.run.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"output      {self.output} ({self.mode} features)",
            f"images      {self.images} stored, {self.errors} failed",
            f"rows        {self.rows}",
            f"size        {_human_bytes(self.bytes)}",
            f"this run    {self.run.processed} processed ({self.run.failed} failed), "
            f"{self.run.skipped} already done, {self.run.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s",
        ]
        if self.random_init:
            lines.append(
                "weights     none given: seeded random initialisation (features are not meaningful)"
            )
        for image_id, reason in self.error_sample:
            lines.append(f"  failed: {image_id}: {reason}")
        if self.errors > len(self.error_sample):
            lines.append(
                f"  ... {self.errors - len(self.error_sample)} more in errors/ of the output"
            )
        if self.merge_hint:
            lines.append(self.merge_hint)
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


# --- building -------------------------------------------------------------------------------------
def build_detector(options: ExtractOptions, info: RankInfo):
    """The detector of a run (fast kernels and batching policy as the options say)."""
    from gridfeats.api import Detector
    from gridfeats.checkpoint.loader import CheckpointError
    from gridfeats.checkpoint.safe_pickle import UnsafePickleError
    from gridfeats.config import get_cfg
    from gridfeats.config.yaml_loader import ConfigError

    try:
        cfg = get_cfg(options.config, list(options.opts))
    except (ConfigError, KeyError, FileNotFoundError) as exc:
        raise ExtractError(f"config: {exc.args[0] if exc.args else exc}") from None
    device = options.device
    if info.distributed and device == "cuda":
        device = f"cuda:{info.local_rank}"
    try:
        detector = Detector(
            cfg,
            options.weights,
            device=device,
            precision=options.precision,
            seed=options.seed,
            max_pixels=options.max_pixels,
            fast=options.fast_kernels,
            batch_forward=options.batched_forward,
        )
        if options.mode == "region":
            detector.require_heads()  # a backbone-only checkpoint makes grids, not regions
    except (CheckpointError, UnsafePickleError) as exc:
        raise ExtractError(f"weights: {exc}") from None
    return detector


def build_feature_maker(options: ExtractOptions, detector):
    selection = "detectron2" if options.regions == "detectron2" else options.bottom_up
    spec = FeatureSpec(options.mode, options.grid_pool, selection, options.attr_topk)
    return make_feature_maker(detector, spec)


def store_metadata(options: ExtractOptions, detector, maker) -> StoreMetadata:
    """Run metadata; the config text ends with the extraction settings that change the rows."""
    settings = maker.settings() + [
        f"precision: {options.precision}",
        f"fast_kernels: {str(options.fast_kernels).lower()}",
        f"batched_forward: {str(options.batched_forward).lower()}",
        f"seed: {options.seed}" if detector.random_init else "seed: n/a (weights given)",
    ]
    config = (
        detector.cfg.dump().rstrip("\n")
        + "\n# gridfeats extract settings:\n"
        + "".join(f"#   {line}\n" for line in settings)
    )
    return StoreMetadata(
        mode=maker.mode,
        feature_dim=maker.feature_dim,
        config=config,
        weights_sha256=detector.weights_sha256,
        dtype=options.dtype,
        attr_topk=maker.attr_topk,
    )


# --- the run --------------------------------------------------------------------------------------
def run_extraction(options: ExtractOptions, log: Optional[TextIO] = None) -> ExtractSummary:
    """Extract features as ``options`` say; returns the summary (of the merged output on rank 0).

    Raises :class:`ExtractError` (or a store/source error, all ``ValueError``) for problems the
    user can fix, :class:`StrictStop` in strict mode at the first bad input.
    """
    options.check()
    log = log if log is not None else sys.stderr
    info = RankInfo.from_env()
    if options.threads:
        torch.set_num_threads(options.threads)
    target = shard_output_path(options.output, options.shard_index, options.shard_count)
    my_file = rank_output_path(target, info.rank, info.world_size) if info.distributed else target
    items = list_images(options.input, options.image_root)
    mine = shard_items(
        shard_items(items, options.shard_index, options.shard_count), info.rank, info.world_size
    )

    distributed.init_process_group(info, timeout_s=options.dist_timeout_s)
    try:
        detector = build_detector(options, info)
        maker = build_feature_maker(options, detector)
        meta = store_metadata(options, detector, maker)
        prior = _merged_ids(target, meta, options, info)
        counts = _extract_into(my_file, mine, prior, meta, maker, detector, options, info, log)
        totals = distributed.sum_over_ranks(
            [counts.listed, counts.skipped, counts.processed, counts.failed, counts.rows]
        )
        if info.distributed and info.is_main:
            files = [rank_output_path(target, r, info.world_size) for r in range(info.world_size)]
            merge_rank_files(target, files, options.compression)
    finally:
        distributed.destroy_process_group()

    run = RunCounts(*totals, seconds=counts.seconds)
    hint = None
    if options.shard_count > 1:
        pattern = shard_output_path(options.output, 0, options.shard_count).replace(
            ".shard-0-", ".shard-*-"
        )
        hint = (
            f"shard {options.shard_index}/{options.shard_count} done; when all are: "
            f"gridfeats merge {options.output} {pattern}"
        )
    if info.distributed and not info.is_main:
        return ExtractSummary(
            my_file,
            maker.mode,
            counts.processed - counts.failed,
            counts.failed,
            counts.rows,
            0,
            run,
            [],
            detector.random_init,
        )
    return summarize(target, run, detector.random_init, hint)


def summarize(
    path: str, run: RunCounts, random_init: bool, hint: Optional[str] = None, sample: int = 10
) -> ExtractSummary:
    """Read the finished store at ``path`` and describe it."""
    store = FeatureStore(path)
    with open_store_file(path) as f:
        rows = int(f["rows/features"].shape[0])
    return ExtractSummary(
        path,
        store.mode,
        len(store),
        len(store.errors),
        rows,
        os.path.getsize(path),
        run,
        list(store.errors[:sample]),
        random_init,
        hint,
    )


def _merged_ids(
    target: str, meta: StoreMetadata, options: ExtractOptions, info: RankInfo
) -> frozenset:
    """Under torchrun: ids an earlier, already merged run put in ``target`` (they are skipped)."""
    if not info.distributed:
        return frozenset()
    if options.overwrite:
        if info.is_main:  # the rank files are overwritten by their own writers
            shutil.rmtree(parts_dir_for(target), ignore_errors=True)
            if os.path.exists(target):
                os.unlink(target)
        return frozenset()
    if os.path.isdir(parts_dir_for(target)):
        raise ExtractError(
            f"an unfinished single-process run into {target} exists ({parts_dir_for(target)}); "
            "finish it with the same command without torchrun, or start over with --overwrite"
        )
    if not os.path.exists(target):
        return frozenset()
    store = FeatureStore(target)
    problems = meta.mismatches(store.meta)
    if problems:
        raise StoreMismatchError(
            f"{target} was made with different settings, refusing to extend it: "
            + "; ".join(problems)
            + ". Use another output or --overwrite."
        )
    ids = set(store.ids)
    if not options.retry_errors:
        ids.update(image_id for image_id, _ in store.errors)
    return frozenset(ids)


def _extract_into(
    path: str,
    items: Sequence[ImageItem],
    prior: frozenset,
    meta: StoreMetadata,
    maker,
    detector,
    options: ExtractOptions,
    info: RankInfo,
    log: TextIO,
) -> RunCounts:
    counts = RunCounts(listed=len(items))
    start = time.perf_counter()
    writer = FeatureWriter(
        path,
        meta,
        compression=options.compression,
        commit_every=options.commit_every,
        retry_errors=options.retry_errors,
        overwrite=options.overwrite,
    )
    try:
        done = writer.done_ids() | prior
        todo = [item for item in items if item.image_id not in done]
        counts.skipped = len(items) - len(todo)
        # Workers start here, before the writer thread exists (see gridfeats.extract.loader).
        batches = (
            iter(
                make_loader(
                    todo,
                    InputSpec.from_cfg(detector.cfg, options.max_pixels),
                    options.batch_size,
                    options.workers,
                    close_in_workers=[os.path.join(writer.parts_dir, "lock")],
                )
            )
            if todo
            else iter(())
        )
    except BaseException:
        writer.abort()
        raise
    with AsyncFeatureWriter(writer) as sink:
        _process(batches, len(todo), sink, maker, options, info, counts, log)
    counts.seconds = time.perf_counter() - start
    return counts


def _process(
    batches,
    total: int,
    sink: AsyncFeatureWriter,
    maker,
    options: ExtractOptions,
    info: RankInfo,
    counts: RunCounts,
    log: TextIO,
) -> None:
    label = f"{maker.mode} rank {info.rank}/{info.world_size}" if info.distributed else maker.mode
    with tqdm(
        total=total,
        unit="img",
        desc=label,
        file=log,
        dynamic_ncols=True,
        smoothing=0.05,
        disable=not (options.progress and info.is_main and total > 0),
    ) as bar:
        for batch in batches:
            loaded = [x for x in batch if not isinstance(x, FailedImage)]
            records = iter(maker.records([x.prepared for x in loaded]) if loaded else [])
            for entry in batch:
                if isinstance(entry, FailedImage):
                    _fail(sink, entry.image_id, entry.reason, options, counts)
                    continue
                record = next(records)
                problem = storage_problem(record, options.dtype)
                if problem is not None:
                    _fail(sink, entry.image_id, problem, options, counts)
                    continue
                sink.add(entry.image_id, record)
                counts.processed += 1
                counts.rows += int(record["features"].shape[0])
            bar.update(len(batch))
            if counts.failed:
                bar.set_postfix(failed=counts.failed, refresh=False)


def _fail(
    sink: AsyncFeatureWriter, image_id: str, reason: str, options: ExtractOptions, counts: RunCounts
) -> None:
    if options.strict:
        raise StrictStop(image_id, reason)
    sink.add_error(image_id, reason)
    counts.processed += 1
    counts.failed += 1
