"""What ``gridfeats vqa ...`` and ``gridfeats caption ...`` do, shared by the two command modules.

The two heads differ only in their task class, their config defaults and their eval metric, so
train/predict live here once; ``vqa.cli_vqa`` and ``vqa.cli_caption`` only declare arguments.
User errors (bad config, missing file, mismatched checkpoint, malformed results...) all derive
from ``ValueError``/``OSError`` and are reported as one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Type

import yaml

from gridfeats.engine import RankInfo, distributed, seed_all_rngs
from vqa.engine.checkpoint import FINAL, LAST, CheckpointError, load_checkpoint
from vqa.engine.config import load_config, with_task_defaults
from vqa.engine.trainer import fit_task

EXIT_USER_ERROR = 2


def task_class(kind: str) -> Type[Any]:
    if kind == "vqa":
        from vqa.engine.vqa_task import VQATask

        return VQATask
    from vqa.engine.caption_task import CaptionTask

    return CaptionTask


def task_defaults(kind: str) -> Dict[str, Any]:
    if kind == "vqa":
        from vqa.engine.vqa_task import VQA_DEFAULTS

        return with_task_defaults(VQA_DEFAULTS)
    from vqa.engine.caption_task import CAPTION_DEFAULTS

    return with_task_defaults(CAPTION_DEFAULTS)


def reports_user_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Turns user errors into ``prog: error: message`` on stderr and exit status 2."""

    def wrap(func: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return func(*args, **kwargs)
            except (ValueError, OSError, CheckpointError) as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return EXIT_USER_ERROR

        return run

    return wrap


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- arguments
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/vqa/)")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="run directory: checkpoints, metrics.jsonl, config.yaml",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt if it exists (else start fresh)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides train.device")
    parser.add_argument(
        "opts",
        nargs="*",
        metavar="OVERRIDE",
        help="config overrides: KEY VALUE pairs or KEY=VALUE words, "
        "e.g. train.epochs 3 model.layers=2",
    )


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint file, or a run directory (uses final.pt, else last.pt)",
    )
    parser.add_argument(
        "--features", help="feature store (default: the one in the training config)"
    )
    parser.add_argument("--out", required=True, type=Path, help="results json to write")
    parser.add_argument("--batch-size", type=int, help="default: train.eval_batch_size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


# --------------------------------------------------------------------------- actions
def train(args: argparse.Namespace, kind: str) -> int:
    cfg = load_config(args.config, task_defaults(kind), args.opts)
    if args.device:
        cfg["train"]["device"] = args.device
    out: Path = args.out
    state = None
    if args.resume and (out / LAST).is_file():
        # Vocabularies must be the ones the checkpointed weights were trained with.
        state = load_checkpoint(out / LAST, kind=kind)["task"]
    rank = RankInfo.from_env()
    device = distributed.resolve_device(cfg["train"]["device"], rank.local_rank)
    distributed.init_process_group(rank, device)
    try:
        seed_all_rngs(int(cfg["train"]["seed"]))
        task = task_class(kind)(cfg, state=state)
        if rank.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        metrics = fit_task(task, cfg, out, device, rank, resume=args.resume)
    finally:
        distributed.destroy_process_group()
    if rank.is_main:
        summary = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        print(json.dumps({"run": str(out), **summary}))
    return 0


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for name in (FINAL, LAST):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {FINAL} or {LAST} in the run directory {path}")
    return path


def load_for_inference(args: argparse.Namespace, kind: str) -> Any:
    """The task rebuilt from a checkpoint (its config and vocabularies), weights loaded."""
    checkpoint = load_checkpoint(_checkpoint_file(args.checkpoint), kind=kind)
    cfg = checkpoint["config"]
    task = task_class(kind)(
        cfg, state=checkpoint["task"], features=args.features, for_training=False
    )
    task.model.load_state_dict(checkpoint["model"])
    task.model.to(distributed.resolve_device(args.device))
    return task


def print_vqa_metrics(metrics: Mapping[str, Any]) -> None:
    """The official script's report layout."""
    print(f"Overall Accuracy is: {metrics['overall']:.2f}")
    for title, key in (("Answer", "perAnswerType"), ("Question", "perQuestionType")):
        if metrics.get(key):
            print(f"Per {title} Type Accuracy is the following:")
            for name, value in metrics[key].items():
                print(f"{name} : {value:.2f}")


def print_caption_metrics(metrics: Mapping[str, float]) -> None:
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
