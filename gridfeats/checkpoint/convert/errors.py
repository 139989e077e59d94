"""The converter's one exception: a source it cannot (or must not) turn into a backbone."""

from __future__ import annotations

from gridfeats.checkpoint.loader import CheckpointError


class ConversionError(CheckpointError):
    """The source holds no backbone, is ambiguous, does not fit the architecture, or lacks a
    number (a ViT's head count) that must be given; the message says which and what to do."""
