"""Training-state files that resume bit-exactly: atomic writes and the random generators' states.

A resumed run must continue exactly where the killed one stopped, so a training checkpoint holds
everything that influences the next step, the random generators included (dropout, sampling,
augmentation draw from Python's, NumPy's and torch's CPU/CUDA generators, one set per rank). A
checkpoint is written to a temporary name in the same folder and renamed over the old one
(``os.replace`` is atomic on POSIX), so a kill during a save leaves the previous file intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import numpy as np
import torch

from gridfeats.checkpoint import CheckpointError

#: Marks files written by the engine; ``load_training_state`` refuses anything else.
TRAINING_STATE_FORMAT = "gridfeats.engine.training_state"

PathLike = Union[str, "os.PathLike[str]"]


def seed_all_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def enable_deterministic_mode() -> None:
    """Deterministic kernels only (errors instead of silently nondeterministic ones).

    The cuBLAS workspace setting is required for deterministic GEMMs on CUDA and harmless on CPU.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def capture_rng_state() -> Dict[str, Any]:
    """This process's generator states (Python, NumPy, torch CPU, and CUDA where present)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(path: PathLike, payload: Dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_training_state(path: PathLike, also_accept: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a file written by the engine's checkpointer; ``CheckpointError`` with the reason.

    ``also_accept``: older format markers a caller can still read (for inference, not resume).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the payload holds RNG tuples and the caller's own objects
        # (vocabularies, configs); these files are produced by this project's training runs.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for truncated/garbage files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    formats = (TRAINING_STATE_FORMAT, *also_accept)
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise CheckpointError(f"{path} is not a gridfeats training checkpoint")
    return payload
