"""``ShapeSpec``: what a module's output looks like, so builders can wire modules by metadata."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (input pixels per feature cell) of one feature map."""

    channels: int
    stride: int
