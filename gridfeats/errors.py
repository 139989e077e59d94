"""The one root of the project's exceptions.

Every error that gridfeats, its service and its heads raise on purpose derives from
:class:`GridfeatsError`, so a caller that embeds the project can catch all of them with one clause
and let genuine bugs (``TypeError``, ``AttributeError``, ...) through. Each class also keeps the
builtin base it had before (``ValueError`` for bad input, ``RuntimeError`` for a state that does
not allow the call), so code that catches the builtin keeps working.

Module-level and import-free on purpose: every other module may import it without cost.
"""

from __future__ import annotations

__all__ = ["GridfeatsError"]


class GridfeatsError(Exception):
    """Base of every exception the project raises on purpose; the message says what went wrong."""
