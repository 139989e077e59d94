"""``gridfeats train-detector``: train (or evaluate) a detector from a config.

    gridfeats train-detector --config CFG --out RUN_DIR [--weights INIT] [--resume] [--eval-only]
        [--precision auto|fp32|bf16|fp16] [--device auto|cpu|cuda] [KEY VALUE ...]
    torchrun --nproc_per_node 2 -m gridfeats train-detector ...   # DDP; IMS_PER_BATCH is global

``DATASETS.TRAIN`` / ``DATASETS.TEST`` are json paths (``gridfeats make-synthetic --out D`` writes
``D/annotations/instances_train.json`` and ``instances_val.json``); see
:mod:`gridfeats.engine.detection` for the run folder and ``docs/training.md`` for the rest.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gridfeats.engine.detection import PRECISION_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML path or shipped config name")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, metrics, eval)")
    parser.add_argument(
        "--weights",
        help="initialisation (.pkl / .pth / converted backbone), overriding MODEL.WEIGHTS; "
        "with --eval-only the model to evaluate (default RUN_DIR/model_final.pth)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue RUN_DIR/last.pt (a killed run) exactly"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate on DATASETS.TEST, do not train"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="training precision (auto: bf16/fp16 autocast on GPUs, fp32 on CPUs)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument(
        "--log-period", type=int, default=20, help="steps between metrics.jsonl records"
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. SOLVER.MAX_ITER 100",
    )


def run(args: argparse.Namespace) -> int:
    from gridfeats.checkpoint import CheckpointError
    from gridfeats.config import ConfigError, get_cfg
    from gridfeats.data.detection_dataset import DetectionDatasetError
    from gridfeats.engine.detection import DetectionTrainingError, evaluate_run, train_detector
    from gridfeats.precision import PrecisionError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        opts = list(args.opts)
        if opts and opts[0] == "--":
            opts = opts[1:]
        if len(opts) % 2:
            raise ConfigError(f"config overrides come in KEY VALUE pairs, got {opts}")
        cfg = get_cfg(args.config, opts)
        if args.eval_only:
            metrics = evaluate_run(
                cfg,
                args.out,
                weights=args.weights,
                device=args.device,
                progress=not args.no_progress,
            )
        else:
            metrics = train_detector(
                cfg,
                args.out,
                weights=args.weights,
                resume=args.resume,
                precision=args.precision,
                device=args.device,
                progress=not args.no_progress,
                log_period=args.log_period,
            )
    except (
        DetectionTrainingError,
        DetectionDatasetError,
        ConfigError,
        CheckpointError,
        PrecisionError,
        FileNotFoundError,
        KeyError,
    ) as exc:
        print(f"gridfeats train-detector: error: {exc}", file=sys.stderr)
        return 2
    if metrics:
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0
