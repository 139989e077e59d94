"""Deterministic kill points for the crash-safety tests.

Setting ``GRIDFEATS_STORE_CRASH_AT=<label>[:<n>]`` makes the process SIGKILL itself the n-th time
(default 1st) the writer reaches the named point, e.g. ``part:before-rename:3``. Labels are printed
by the writer code at each ``hit`` call site (``part:*``, ``final:*``, ``writer:*``). It exists so
tests can kill a writer exactly between two steps of the commit protocol, which random external
kills reach only by luck. Unset (the normal case) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Dict

ENV_VAR = "GRIDFEATS_STORE_CRASH_AT"
_hits: Dict[str, int] = {}


def hit(label: str) -> None:
    """Count a pass through ``label`` and SIGKILL this process if the env var asks for it."""
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    name, _, nth = target.rpartition(":")
    if not name or not nth.isdigit():
        name, nth = target, "1"
    if name != label:
        return
    _hits[label] = _hits.get(label, 0) + 1
    if _hits[label] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
