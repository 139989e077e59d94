"""Training metrics as JSON lines (one object per record), with optional TensorBoard mirroring.

JSON lines stay readable by ``jq``/pandas and append-safe across a resume: on resume, records
newer than the checkpoint are dropped first, so the log of a resumed run reads like the log of
an uninterrupted one.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union


def read_metrics(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """All records of a metrics log (skipping a torn last line left by a kill)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends ``{"kind", "step", "epoch", "time", ...values}`` records to ``path``."""

    def __init__(
        self,
        path: Union[str, Path],
        tensorboard_dir: Optional[Union[str, Path]] = None,
        resume_from_step: Optional[int] = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_from_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "TensorBoard logging requested but the 'tensorboard' package is "
                    "not installed; writing the JSON-lines log only",
                    stacklevel=2,
                )
            else:
                self._writer = SummaryWriter(str(tensorboard_dir))

    def log(self, kind: str, step: int, epoch: int, **values: Any) -> None:
        self.write({"kind": kind, "step": step, "epoch": epoch, "time": time.time(), **values})

    def write(self, record: Dict[str, Any]) -> None:
        """Append one record (it must hold ``kind`` and ``step``); the file is closed after each
        line, so a kill loses at most the line being written."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in record.items():
                if name not in ("kind", "step", "epoch", "time") and isinstance(
                    value, (int, float)
                ):
                    self._writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
