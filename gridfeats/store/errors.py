"""Exceptions of the feature store.

They derive from the project's ``GridfeatsError`` and from ``ValueError`` because each one
describes a user-fixable situation (wrong file, mismatched resume, conflicting shards);
command-line wrappers print their message instead of a traceback.
"""

from __future__ import annotations

from gridfeats.errors import GridfeatsError


class StoreError(GridfeatsError, ValueError):
    """Base class: a feature-store file or operation cannot be used as asked."""


class StoreFormatError(StoreError):
    """The file is not a readable gridfeats feature store (wrong format, version or layout)."""


class StoreMismatchError(StoreError):
    """Existing output has other run metadata (mode, dims, config, weights, dtype)."""


class StoreBusyError(StoreError):
    """Another writer process holds the output's lock."""


class StoreIncompleteError(StoreError):
    """The output has only part files: its run was interrupted or is still going."""


class MergeConflictError(StoreError):
    """Two shards hold different values for the same image id."""


class StaleFeatureLayoutWarning(UserWarning):
    """A store written by an earlier gridfeats whose region features meant something else."""
