"""A batch of differently sized images padded into one tensor (Detectron2's ``ImageList``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass
class ImageList:
    """``tensor`` is ``[N, C, H, W]``; ``image_sizes[i]`` is image i's unpadded ``(h, w)``.

    Images are padded at the bottom and right with ``pad_value`` (0 after normalisation, i.e. the
    mean colour). Sizes are kept so anchors and boxes are clipped to each image, not to the padded
    size.
    """

    tensor: torch.Tensor
    image_sizes: List[Tuple[int, int]]

    def __len__(self) -> int:
        return len(self.image_sizes)

    @staticmethod
    def from_tensors(
        tensors: Sequence[torch.Tensor], size_divisibility: int = 0, pad_value: float = 0.0
    ) -> "ImageList":
        if len(tensors) == 0:
            raise ValueError("ImageList needs at least one image")
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in sizes)
        max_w = max(w for _, w in sizes)
        if size_divisibility > 1:
            d = size_divisibility
            max_h, max_w = (max_h + d - 1) // d * d, (max_w + d - 1) // d * d
        if len(tensors) == 1 and sizes[0] == (max_h, max_w):
            return ImageList(tensors[0].unsqueeze(0), sizes)
        batch = torch.stack(
            [
                F.pad(t, (0, max_w - t.shape[-1], 0, max_h - t.shape[-2]), value=pad_value)
                for t in tensors
            ]
        )
        return ImageList(batch, sizes)
