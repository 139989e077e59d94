"""Shared pieces of the detector-training tests: synthetic data, the tiny config, runs."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pycocotools.cocoeval  # noqa: F401  (imported before forking: children start warm)
import torch

import gridfeats.api  # noqa: F401
import gridfeats.engine.detection  # noqa: F401
import gridfeats.evaluation  # noqa: F401
import gridfeats.modeling.build  # noqa: F401
from gridfeats.cli import main as gridfeats_main
from gridfeats.data.synthetic import make_synthetic

TINY_CONFIG = Path(__file__).resolve().parent / "tiny-detector.yaml"
REPO = Path(__file__).resolve().parents[2]


def synthetic_data(root: Path, num: int = 8, seed: int = 0) -> Dict[str, Path]:
    return make_synthetic(root, num, seed=seed, val_fraction=0.25)


def train_args(
    data: Dict[str, Path], out: Path, *extra: str, opts: Sequence[str] = ()
) -> List[str]:
    """``gridfeats train-detector`` arguments for the tiny config on ``data``."""
    return [
        "train-detector",
        "--config",
        str(TINY_CONFIG),
        "--out",
        str(out),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--no-progress",
        "--log-period",
        "1",
        *extra,
        "DATASETS.TRAIN",
        f"('{data['train_instances']}',)",
        "DATASETS.TEST",
        f"('{data['val_instances']}',)",
        *opts,
    ]


def forked(args: Sequence[str], env: Optional[Dict[str, str]] = None) -> int:
    """``gridfeats`` ``args`` in a forked child (no interpreter start-up); its exit code
    (``-9`` when it SIGKILLed itself)."""

    def child() -> None:
        os.environ.update(env or {})
        os._exit(gridfeats_main(list(args)))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(timeout=300)
    return process.exitcode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def final_weights(run: Path) -> Dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def eval_files(run: Path) -> Dict[str, dict]:
    """The run's periodic evaluations (``eval/iter_*.json``) by file name."""
    return {
        p.name: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((run / "eval").glob("iter_*.json"))
    }


def subprocess_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env
