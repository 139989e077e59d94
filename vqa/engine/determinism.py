"""Seeding and the deterministic mode that makes a killed-and-resumed run match a straight one."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
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
