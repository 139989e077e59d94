"""Detector training on the engine: :func:`train_detector` and :func:`evaluate_run`.

    from gridfeats.config import get_cfg
    from gridfeats.engine.detection import train_detector, evaluate_run
    cfg = get_cfg("my.yaml", ["DATASETS.TRAIN", "('data/annotations/instances_train.json',)"])
    metrics = train_detector(cfg, "runs/det")            # {"bbox/AP": ..., "attr/top1": ...}
    metrics = train_detector(cfg, "runs/det", resume=True)  # continue a killed run exactly
    evaluate_run(cfg, "runs/det")                         # --eval-only: the saved model again

This is grid-feats-vqa's ``train_net.py`` on the project's one loop (``gridfeats.engine.Trainer``):

* **Data**: ``DATASETS.TRAIN``/``DATASETS.TEST`` are paths to COCO-format json files with
  ``attribute_ids`` (:func:`gridfeats.data.detection_dataset.load_coco_with_attributes_json`).
  Image ``file_name``\\ s are relative to the ``images/`` folder beside the json's folder
  (``ROOT/annotations/x.json`` -> ``ROOT/images/``), which is grid-feats-vqa's Visual Genome
  layout and ``gridfeats make-synthetic``'s; absolute ``file_name``\\ s are used as they are.
  Training images go through the train mapper and the resumable, aspect-ratio-grouped stream
  (:mod:`gridfeats.data.samplers`); ``SOLVER.IMS_PER_BATCH`` is the global batch under torchrun.
* **Model and solver**: :func:`gridfeats.build_model` (``MODEL.WEIGHTS`` or ``weights=``: a Caffe2
  ``.pkl``, a Detectron2 ``.pth``, a backbone converted by ``gridfeats convert-backbone``; ``""``
  is a seeded random initialisation), :func:`gridfeats.build_optimizer` (which also applies
  ``SOLVER.CLIP_GRADIENTS``, per tensor as Detectron2 does) and
  :func:`gridfeats.build_lr_scheduler`, stepped every iteration.
* **Seeds**: ``SEED`` (negative: drawn once and written to the run's ``config.yaml``). The model is
  initialised from ``SEED`` on every rank; training randomness (the samplers' ``torch.randperm``)
  from ``SEED + rank``; the data stream and augmentations from ``SEED`` alone, as Detectron2 does.
* **Rank invariance** (``SOLVER.RANK_INVARIANT``, gridfeats' own key, off by default): each
  image is sampled from a generator seeded from ``SEED`` and its global stream position, and the
  ROI losses are normalised over all ranks, so N ranks train like one process of the same global
  batch (:func:`check_rank_invariance` refuses or warns about the settings where they cannot).
* **Precision**: ``auto`` is bf16 autocast on GPUs that have it (fp16 with a grad scaler
  otherwise) and fp32 on CPUs: even with native bf16 (AMX), a bf16 R-50-grid training step
  measured 1.4x slower than fp32 here (its forward is faster, its backward 2x slower;
  ``benchmarks/train.py``), so ``bf16`` on a CPU is an explicit choice. Evaluation runs in fp32.

The run folder::

    RUN_DIR/config.yaml          the effective config (SEED and MODEL.WEIGHTS resolved)
    RUN_DIR/last.pt              resumable state: model, optimizer, scheduler, iteration, RNGs
                                 (every SOLVER.CHECKPOINT_PERIOD iterations and at the end)
    RUN_DIR/model_final.pth      {"model", "iteration", "metrics"}: for Detector / extract --weights
    RUN_DIR/metrics.jsonl        train records every ``log_period`` steps, eval records
    RUN_DIR/loss_curve.png       the loss terms against the step
    RUN_DIR/eval/iter_NNNNNNN.json  every evaluation (TEST.EVAL_PERIOD, and at the end)
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml

from gridfeats.data.detection_dataset import (
    DetectionMetadata,
    filter_images_without_annotations,
    load_coco_with_attributes_json,
)
from gridfeats.engine import distributed, hooks
from gridfeats.engine.checkpoint import load_training_state, save_atomic, seed_all_rngs
from gridfeats.engine.loss_curve import plot_loss_curve
from gridfeats.engine.metrics_log import read_metrics
from gridfeats.engine.trainer import HookBase, Trainer
from gridfeats.errors import GridfeatsError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Dataset = Tuple[str, List[Dict[str, Any]], DetectionMetadata]

CONFIG_FILE = "config.yaml"
LAST_FILE = hooks.LAST
FINAL_MODEL_FILE = "model_final.pth"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
EVAL_DIR = "eval"
#: The metrics of an evaluation that go into metrics.jsonl (per-class APs stay in the eval json).
LOGGED_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP", "top1", "top5")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


class DetectionTrainingError(GridfeatsError, ValueError):
    """A training or evaluation request that cannot run; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------- datasets
def default_image_root(json_file: PathLike) -> Path:
    """``ROOT/images`` for ``ROOT/annotations/name.json`` (grid-feats-vqa's and make-synthetic's
    layout)."""
    return Path(json_file).resolve().parent.parent / "images"


def image_root(cfg, json_file: PathLike) -> Path:
    """Where ``json_file``'s images are: ``DATASETS.IMAGE_ROOT`` when set, else
    :func:`default_image_root`."""
    root = str(cfg.DATASETS.IMAGE_ROOT)
    if not root:
        return default_image_root(json_file)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DetectionTrainingError(f"DATASETS.IMAGE_ROOT {root!r} is not a folder")
    return path


def load_datasets(cfg, key: str) -> List[Dataset]:
    """``(name, records, metadata)`` per json path in ``cfg.DATASETS.<key>`` (TRAIN or TEST), with
    image paths under :func:`image_root`."""
    datasets = []
    for entry in getattr(cfg.DATASETS, key):
        path = Path(str(entry)).expanduser()
        if not path.is_file():
            raise DetectionTrainingError(
                f"DATASETS.{key} entry {str(entry)!r} is not a json file: gridfeats reads datasets "
                "as paths to COCO-format json files with attribute_ids, e.g. "
                f"DATASETS.{key} \"('data/annotations/instances_train.json',)\""
            )
        records, metadata = load_coco_with_attributes_json(
            path, image_root(cfg, path), int(cfg.INPUT.MAX_ATTR_PER_INS)
        )
        datasets.append((path.stem, records, metadata))
    return datasets


def training_records(cfg) -> Tuple[List[Dict[str, Any]], DetectionMetadata]:
    """All ``DATASETS.TRAIN`` records (empty images dropped per FILTER_EMPTY_ANNOTATIONS),
    checked against the model's class and attribute counts."""
    datasets = load_datasets(cfg, "TRAIN")
    if not datasets:
        raise DetectionTrainingError("DATASETS.TRAIN is empty: name at least one json file")
    metadata = datasets[0][2]
    records: List[Dict[str, Any]] = []
    for name, part, meta in datasets:
        if meta.thing_classes != metadata.thing_classes:
            raise DetectionTrainingError(
                f"DATASETS.TRAIN: {name} has other categories than {datasets[0][0]}"
            )
        records += part
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        records = filter_images_without_annotations(records)
    if not records:
        raise DetectionTrainingError("DATASETS.TRAIN holds no image with an annotation")
    check_labels(cfg, records, metadata)
    return records, metadata


def check_labels(cfg, records: Sequence[Mapping[str, Any]], metadata: DetectionMetadata) -> None:
    """Classes and attribute ids must fit the heads (else the losses fail deep inside)."""
    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if len(metadata.thing_classes) > num_classes:
        raise DetectionTrainingError(
            f"the data has {len(metadata.thing_classes)} categories but "
            f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}"
        )
    if cfg.MODEL.ATTRIBUTE_ON:
        num_attributes = int(cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES)
        largest = max(
            (a for r in records for ann in r["annotations"] for a in ann.get("attribute_ids", [])),
            default=-1,
        )
        if largest >= num_attributes:
            raise DetectionTrainingError(
                f"attribute id {largest} in the data, but MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES is "
                f"{num_attributes}"
            )


# --------------------------------------------------------------------------------- settings
def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 (fp16 before Ampere) on GPUs, fp32 on CPUs (see the module docstring);
    an explicit choice is kept (and checked against the device by the engine)."""
    if name not in PRECISION_CHOICES:
        raise DetectionTrainingError(f"precision must be one of {PRECISION_CHOICES}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _shared_random_seed() -> int:
    seed = secrets.randbelow(2**31)
    return int(distributed.all_gather_objects([seed])[0])  # rank 0's, on every rank


def run_config(cfg, out_dir: PathLike, weights: Optional[PathLike], resuming: bool):
    """``cfg`` with ``SEED`` fixed (the saved run's on resume) and ``MODEL.WEIGHTS`` set."""
    cfg = cfg.clone()
    cfg.defrost()
    saved_path = Path(out_dir) / CONFIG_FILE
    if resuming and saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        saved_seed = int(saved.get("SEED", -1))
        if cfg.SEED >= 0 and cfg.SEED != saved_seed:
            logger.warning("resuming with the run's SEED %d, not %d", saved_seed, cfg.SEED)
        cfg.SEED = saved_seed
    if cfg.SEED < 0:
        cfg.SEED = _shared_random_seed()
    if weights is not None:
        cfg.MODEL.WEIGHTS = os.fspath(weights)
    if "://" in cfg.MODEL.WEIGHTS and not resuming:
        raise DetectionTrainingError(
            f"MODEL.WEIGHTS is {cfg.MODEL.WEIGHTS!r}: gridfeats never downloads; pass a local "
            'file with --weights (e.g. R-50.pkl), or MODEL.WEIGHTS "" to train from scratch'
        )
    cfg.freeze()
    return cfg


def check_rank_invariance(cfg, world_size: int) -> None:
    """``SOLVER.RANK_INVARIANT`` under more than one rank cannot hold with aspect-ratio grouping:
    its buckets are filled per rank, so ranks batch other images than one process would."""
    if cfg.SOLVER.RANK_INVARIANT and world_size > 1 and cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        raise DetectionTrainingError(
            f"SOLVER.RANK_INVARIANT with {world_size} ranks needs DATALOADER.ASPECT_RATIO_GROUPING "
            "False (its buckets are per rank, so the ranks would not see one process's batches)"
        )


def rank_invariance_warnings(
    cfg, records: Sequence[Mapping[str, Any]], model: torch.nn.Module, world_size: int
) -> List[str]:
    """The reasons ``SOLVER.RANK_INVARIANT`` will only be approximate in this run (empty when it
    is off or there is one rank): batch-statistics BatchNorm, or images of different sizes."""
    if not cfg.SOLVER.RANK_INVARIANT or world_size <= 1:
        return []
    reasons = []
    batch_norms = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, torch.nn.SyncBatchNorm)
    ]
    if batch_norms:
        reasons.append(
            f"{len(batch_norms)} BatchNorm layers (e.g. {batch_norms[0]}) use per-rank batch "
            "statistics; use FrozenBN or no norm for exact rank invariance"
        )
    sizes = {(r.get("height"), r.get("width")) for r in records}
    short_sides = set(cfg.INPUT.MIN_SIZE_TRAIN)
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range":
        short_sides = set(range(min(short_sides), max(short_sides) + 1))
    if len(sizes) > 1 or len(short_sides) > 1:
        reasons.append(
            "training images can differ in size: a one-process batch pads them to a common size, "
            "which changes the features near the padded borders, so ranks match it only "
            "approximately"
        )
    return reasons


# --------------------------------------------------------------------------------- evaluation
def _evaluate_sets(detector, datasets: Sequence[Dataset], progress: bool) -> Dict[str, Any]:
    from gridfeats.evaluation import evaluate_detector

    return {
        name: evaluate_detector(detector, records, meta, progress, f"eval {name}")
        for name, records, meta in datasets
    }


def logged_metrics(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, float]:
    """``bbox/AP``, ``attr/top1``... of each dataset (prefixed by its name when there are
    several)."""
    flat: Dict[str, float] = {}
    for name, metrics in results.items():
        prefix = f"{name}/" if len(results) > 1 else ""
        for group, short in (("bbox", "bbox"), ("attributes", "attr")):
            for key, value in metrics.get(group, {}).items():
                if key in LOGGED_METRICS:
                    flat[f"{prefix}{short}/{key}"] = float(value)
    return flat


def _json_safe(value: Any) -> Any:
    """NaN/inf (metrics pycocotools cannot compute) become null: the files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=1), encoding="utf-8")
    tmp.replace(path)


class _PeriodicEvaluation:
    """The EvalHook's function: evaluate the live model, write ``eval/iter_N.json``."""

    def __init__(self, cfg, out: Path, datasets: Sequence[Dataset], progress: bool):
        self.cfg, self.out, self.datasets, self.progress = cfg, out, datasets, progress
        self.trainer: Optional[Trainer] = None

    def __call__(self) -> Dict[str, float]:
        from gridfeats.api import Detector

        trainer = self.trainer
        detector = Detector.from_model(trainer.unwrapped_model, self.cfg, precision="fp32")
        results = _evaluate_sets(detector, self.datasets, self.progress)
        _write_json(
            self.out / EVAL_DIR / f"iter_{trainer.iter:07d}.json",
            {"iteration": trainer.iter, "datasets": results},
        )
        flat = logged_metrics(results)
        logger.info("iteration %d: %s", trainer.iter, flat)
        return flat


class LossCurveHook(HookBase):
    """Redraws ``loss_curve.png`` from ``metrics.jsonl`` every ``period`` steps and at the end
    (rank 0). Place it after the ``MetricsWriter``."""

    def __init__(self, metrics_path: Path, png_path: Path, period: int):
        self.metrics_path, self.png_path, self.period = metrics_path, png_path, int(period)

    def _draw(self) -> None:
        if self.trainer.rank.is_main:
            plot_loss_curve(read_metrics(self.metrics_path), self.png_path, "train-detector losses")

    def after_step(self) -> None:
        if self.period and self.trainer.iter % self.period == 0:
            self._draw()

    def after_train(self) -> None:
        self._draw()


class FinalModelHook(HookBase):
    """Writes ``model_final.pth`` (``{"model", "iteration", "metrics"}``, rank 0) at the end:
    the weights file that ``Detector``, ``gridfeats extract`` and ``--eval-only`` read."""

    def __init__(self, path: Path):
        self.path = path

    def after_train(self) -> None:
        t = self.trainer
        if t.rank.is_main:
            state = {k: v.detach().cpu() for k, v in t.unwrapped_model.state_dict().items()}
            save_atomic(
                self.path,
                {"model": state, "iteration": t.iter, "metrics": dict(t.latest_eval or {})},
            )


# --------------------------------------------------------------------------------- training
def train_detector(
    cfg,
    out_dir: PathLike,
    *,
    weights: Optional[PathLike] = None,
    resume: bool = False,
    precision: str = "auto",
    device: str = "auto",
    progress: bool = True,
    log_period: int = 20,
) -> Dict[str, float]:
    """Train the detector of ``cfg`` into ``out_dir`` (the layout of the module docstring).

    Args:
        cfg: a config from :func:`gridfeats.get_cfg` (``DATASETS.TRAIN``/``TEST`` are json paths).
        weights: initialisation, overriding ``MODEL.WEIGHTS`` (ignored when resuming).
        resume: continue from ``out_dir/last.pt`` when it exists (else start); without it an
            ``out_dir`` that already holds a run is refused.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see the module docstring).
        device: ``auto`` (the local GPU under torchrun, else the CPU), ``cpu`` or ``cuda``.
        log_period: steps between ``train`` records in ``metrics.jsonl``.

    Returns the last evaluation's metrics (``bbox/AP``, ``bbox/AP50``, ..., ``attr/top1``; empty
    without ``DATASETS.TEST``). Under torchrun every rank calls this; rank 0 writes the files.
    """
    rank = distributed.RankInfo.from_env()
    dev = distributed.resolve_device(device)
    joined_here = rank.distributed and not torch.distributed.is_initialized()
    distributed.init_process_group(rank, dev)
    try:
        return _train(cfg, Path(out_dir), weights, resume, precision, dev, progress, log_period)
    finally:
        if joined_here:
            distributed.destroy_process_group()


def _train(
    cfg,
    out: Path,
    weights: Optional[PathLike],
    resume: bool,
    precision: str,
    dev: torch.device,
    progress: bool,
    log_period: int,
) -> Dict[str, float]:
    from gridfeats.data.detection_mapper import DetectionTrainMapper
    from gridfeats.data.samplers import build_detection_train_loader
    from gridfeats.modeling.build import build_model
    from gridfeats.solver import build_lr_scheduler, build_optimizer

    rank = distributed.rank_info()
    last = out / LAST_FILE
    if last.exists() and not resume:
        raise DetectionTrainingError(
            f"{out} already holds a run ({last}); pass --resume to continue it, or another --out"
        )
    resuming = resume and last.is_file()
    cfg = run_config(cfg, out, weights, resuming)
    check_rank_invariance(cfg, rank.world_size)
    precision = resolve_precision(precision, dev)
    records, _ = training_records(cfg)
    test_sets = load_datasets(cfg, "TEST")
    if rank.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(cfg.dump(), encoding="utf-8")
    distributed.barrier()

    seed = int(cfg.SEED)
    seed_all_rngs(seed)  # the same initial weights on every rank
    init = None if resuming else (cfg.MODEL.WEIGHTS or None)
    model = build_model(cfg, weights=init).to(dev)
    if rank.is_main:
        for reason in rank_invariance_warnings(cfg, records, model, rank.world_size):
            logger.warning("SOLVER.RANK_INVARIANT is approximate: %s", reason)
    seed_all_rngs(seed + rank.rank)  # each rank's own sampling stream, as Detectron2 seeds them
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    loader = build_detection_train_loader(
        cfg, records, DetectionTrainMapper.from_config(cfg), seed, rank.rank, rank.world_size
    )
    trainer = Trainer(
        model,
        loader,
        optimizer,
        scheduler,
        max_iter=int(cfg.SOLVER.MAX_ITER),
        precision=precision,
        device=dev,
        move_batch=False,  # the model moves its inputs, as Detectron2's models do
        ddp_kwargs={"broadcast_buffers": False},
    )
    evaluation = None
    if test_sets:
        evaluation = _PeriodicEvaluation(cfg, out, test_sets, progress)
        evaluation.trainer = trainer
    period = int(cfg.SOLVER.CHECKPOINT_PERIOD)
    trainer.register_hooks(
        [
            hooks.MetricsWriter(
                out / METRICS_FILE, period=log_period, progress=progress, description="train"
            ),
            hooks.EvalHook(evaluation, period=int(cfg.TEST.EVAL_PERIOD)) if evaluation else None,
            hooks.PeriodicCheckpointer(
                out,
                period=period,
                epoch_end=False,
                extra_state=lambda: {"config": cfg.dump()},
                final_name=None,
            ),
            LossCurveHook(out / METRICS_FILE, out / LOSS_CURVE_FILE, period),
            FinalModelHook(out / FINAL_MODEL_FILE),
        ]
    )
    if resuming:
        trainer.resume(last)
        logger.info("resumed %s at iteration %d", last, trainer.iter)
    trainer.train()
    return dict(trainer.latest_eval or {})


# --------------------------------------------------------------------------------- --eval-only
def evaluate_run(
    cfg,
    out_dir: PathLike,
    *,
    weights: Optional[PathLike] = None,
    device: str = "auto",
    progress: bool = True,
) -> Dict[str, float]:
    """``--eval-only``: evaluate ``weights`` (default ``out_dir/model_final.pth``, else the model in
    ``out_dir/last.pt``) on ``DATASETS.TEST`` in fp32; writes ``out_dir/eval/eval_only.json`` and
    returns the logged metrics (as :func:`train_detector` does). Under torchrun only rank 0
    evaluates (the others return an empty dict)."""
    from gridfeats.api import Detector
    from gridfeats.modeling.build import build_model

    if not distributed.is_main_process():
        return {}
    out = Path(out_dir)
    test_sets = load_datasets(cfg, "TEST")
    if not test_sets:
        raise DetectionTrainingError("DATASETS.TEST is empty: nothing to evaluate")
    dev = distributed.resolve_device(device)
    iteration = None
    if weights is None and not (out / FINAL_MODEL_FILE).is_file() and (out / LAST_FILE).is_file():
        state = load_training_state(out / LAST_FILE)
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        detector = Detector.from_model(model.to(dev), cfg, precision="fp32")
        source, iteration = out / LAST_FILE, int(state["iteration"])
    else:
        source = Path(weights) if weights is not None else out / FINAL_MODEL_FILE
        if not source.is_file():
            raise DetectionTrainingError(
                f"no weights to evaluate: {source} does not exist (train first, or pass --weights)"
            )
        detector = Detector(cfg, weights=source, device=dev, precision="fp32")
    results = _evaluate_sets(detector, test_sets, progress)
    _write_json(
        out / EVAL_DIR / "eval_only.json",
        {"weights": os.fspath(source), "iteration": iteration, "datasets": results},
    )
    return logged_metrics(results)


__all__ = [
    "DetectionTrainingError",
    "LossCurveHook",
    "FinalModelHook",
    "default_image_root",
    "image_root",
    "evaluate_run",
    "load_datasets",
    "logged_metrics",
    "resolve_precision",
    "run_config",
    "train_detector",
    "training_records",
]
