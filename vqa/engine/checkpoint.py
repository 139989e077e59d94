"""Training checkpoints that resume bit-exactly: weights, optimizer, scheduler, RNGs, position.

A resumed run must continue exactly where the killed one was, so a checkpoint holds everything
that influences the next step: model and optimizer tensors, the scheduler's step count, the
Python/NumPy/torch random generators (dropout, SCST sampling) and the position in the data
(epoch and batch within it; the data order itself is re-derived from the seed, see
``vqa.engine.sampler``). Files are written to a temporary name and renamed, so a kill during a
save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from gridfeats.checkpoint.loader import CheckpointError  # the project's one CheckpointError

LAST = "last.pt"
FINAL = "final.pt"
BEST = "best.pt"
CHECKPOINT_FORMAT = "gridfeats.vqa.checkpoint"


def capture_rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (state dicts without 'module.')."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: Union[str, Path], payload: Dict[str, Any]) -> Path:
    """Atomically writes ``payload`` (plus a format marker) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Union[str, Path], kind: Optional[str] = None) -> Dict[str, Any]:
    """Loads a checkpoint written by ``save_checkpoint``; ``kind`` ("vqa"/"caption") is checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the payload holds vocabularies and RNG tuples, and these files
        # are produced by this project's own training runs.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for truncated/garbage files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a gridfeats VQA/captioning checkpoint")
    if kind is not None and payload.get("kind") != kind:
        raise CheckpointError(
            f"{path} is a {payload.get('kind')!r} checkpoint, expected a {kind!r} one"
        )
    return payload
