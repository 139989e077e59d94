"""Detectron2's ``DefaultAnchorGenerator`` for a single feature level.

Order matters for parity with checkpoints: cell anchors are size-major (``a = 3 * size + ratio``),
ratio is h/w, and the full list is row-major over cells then anchors, with cell ``(y, x)`` shifted
by
``(x, y) * stride + offset * stride`` (offset 0: anchor centres sit on the cell's top-left corner).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """``[len(sizes) * len(aspect_ratios), 4]`` anchors centred at 0, computed in double."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class DefaultAnchorGenerator(nn.Module):
    """Anchors for one level. ``cell_anchors.0`` is a saved buffer, as in Detectron2@ffff8ac."""

    def __init__(
        self,
        sizes: Sequence[float],
        aspect_ratios: Sequence[float],
        stride: int,
        offset: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"anchor offset must be in [0, 1), got {offset}")
        self.stride = stride
        self.offset = offset
        self.cell_anchors = _BufferList([generate_cell_anchors(sizes, aspect_ratios)])

    @property
    def num_anchors(self) -> int:
        return int(self.cell_anchors[0].shape[0])

    def grid_anchors(self, feature_hw: Sequence[int]) -> torch.Tensor:
        """All anchors of an ``H x W`` map: ``[H * W * A, 4]``, index ``(y * W + x) * A + a``."""
        h, w = int(feature_hw[0]), int(feature_hw[1])
        base = self.cell_anchors[0]
        device = base.device
        start = self.offset * self.stride
        shifts_x = torch.arange(
            start, w * self.stride, step=self.stride, dtype=torch.float32, device=device
        )
        shifts_y = torch.arange(
            start, h * self.stride, step=self.stride, dtype=torch.float32, device=device
        )
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class _BufferList(nn.Module):
    """A list of tensors registered as (persistent) buffers named ``0``, ``1``, ..."""

    def __init__(self, buffers: List[torch.Tensor]):
        super().__init__()
        for i, b in enumerate(buffers):
            self.register_buffer(str(i), b)

    def __len__(self) -> int:
        return len(self._buffers)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._buffers[str(i)]


def build_anchor_generator(cfg, stride: int) -> DefaultAnchorGenerator:
    a = cfg.MODEL.ANCHOR_GENERATOR
    if a.NAME != "DefaultAnchorGenerator":
        raise ValueError(f"MODEL.ANCHOR_GENERATOR.NAME {a.NAME!r} is not supported")
    if len(a.SIZES) != 1 or len(a.ASPECT_RATIOS) != 1:
        raise ValueError("only single-level anchors (one SIZES / ASPECT_RATIOS list) are supported")
    return DefaultAnchorGenerator(a.SIZES[0], a.ASPECT_RATIOS[0], stride, a.OFFSET)
