"""The training engine: one loop with hooks for the heads, detector training and pretraining.

    from gridfeats.engine import Trainer, GradClip, ResumableBatchSampler, build_param_groups, hooks

See ``gridfeats.engine.trainer`` for the loop and its exact-resume contract, ``hooks`` for
checkpoints/evaluation/metrics/EMA, ``distributed`` for torchrun rank information, and
``docs/engine.md`` for how a new kind of training plugs in.
"""

from gridfeats.engine import distributed, hooks
from gridfeats.engine.checkpoint import (
    capture_rng_state,
    enable_deterministic_mode,
    load_training_state,
    restore_rng_state,
    save_atomic,
    seed_all_rngs,
)
from gridfeats.engine.distributed import RankInfo
from gridfeats.engine.metrics_log import MetricsLog, read_metrics
from gridfeats.engine.param_groups import build_param_groups
from gridfeats.engine.sampler import ResumableBatchSampler
from gridfeats.engine.trainer import KILL_ENV, GradClip, HookBase, Trainer, move_to_device, unwrap

__all__ = [
    "GradClip",
    "HookBase",
    "KILL_ENV",
    "MetricsLog",
    "RankInfo",
    "ResumableBatchSampler",
    "Trainer",
    "build_param_groups",
    "capture_rng_state",
    "distributed",
    "enable_deterministic_mode",
    "hooks",
    "load_training_state",
    "move_to_device",
    "read_metrics",
    "restore_rng_state",
    "save_atomic",
    "seed_all_rngs",
    "unwrap",
]
