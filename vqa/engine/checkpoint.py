"""The heads' checkpoint files: the engine's training state plus the head's own entries.

Files are written by ``gridfeats.engine`` (atomic, with every rank's generator states and the data
position, see ``gridfeats.engine.trainer``) through the hooks that ``vqa.engine.trainer`` installs,
with ``kind`` ("vqa"/"caption"), ``config`` and ``task`` (vocabularies, feature width) added, so
that ``predict`` needs nothing but the checkpoint. ``load_checkpoint`` checks the kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from gridfeats.checkpoint import CheckpointError
from gridfeats.engine import load_training_state
from gridfeats.engine.hooks import BEST, FINAL, LAST

__all__ = ["BEST", "FINAL", "LAST", "PRE_ENGINE_FORMAT", "CheckpointError", "load_checkpoint"]


#: The marker of checkpoints written before the heads moved onto the engine: still readable by
#: ``predict`` (model, config, vocabularies), not resumable.
PRE_ENGINE_FORMAT = "gridfeats.vqa.checkpoint"


def load_checkpoint(path: Union[str, Path], kind: Optional[str] = None) -> Dict[str, Any]:
    """Loads a head's checkpoint; ``kind`` ("vqa"/"caption") is checked when given."""
    payload = load_training_state(path, also_accept=(PRE_ENGINE_FORMAT,))
    if "kind" not in payload:
        raise CheckpointError(f"{path} is not a gridfeats VQA/captioning checkpoint")
    if kind is not None and payload.get("kind") != kind:
        raise CheckpointError(
            f"{path} is a {payload.get('kind')!r} checkpoint, expected a {kind!r} one"
        )
    return payload
