"""Checks a record must pass before it is stored or served."""

from __future__ import annotations

from typing import Optional

import numpy as np

from gridfeats.store.records import Record

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def storage_problem(record: Record, dtype: str) -> Optional[str]:
    """Why ``record`` cannot be stored faithfully in ``dtype`` (non-finite values or float16
    overflow), or None.

    Checked before the record reaches the writer thread, so one bad image becomes an entry in
    ``errors/`` instead of stopping the run.
    """
    features = record["features"]
    if features.size == 0:
        return None
    if not np.isfinite(features).all():
        return "non-finite features (NaN or inf) from the model"
    if dtype == "float16":
        peak = float(np.abs(features).max())
        if peak > _FLOAT16_MAX:
            return (
                f"features overflow float16 storage (max |value| {peak:.4g} > "
                f"{_FLOAT16_MAX:.0f}); use --dtype float32"
            )
    return None
