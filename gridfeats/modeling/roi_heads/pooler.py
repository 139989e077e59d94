"""ROI pooling from a single feature map with torchvision's ``roi_align`` (ROIAlignV2 = aligned)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torchvision.ops import roi_align

from gridfeats.layers.roi_align_gather import gather_pays_off, roi_align_gather


class ROIPooler(nn.Module):
    """Pool ``output_size x output_size`` features for boxes given in input-image pixels.

    ``ROIAlignV2`` shifts boxes by -0.5 pixel (``aligned=True``), which the released models were
    trained with; ``ROIAlign`` is the legacy unshifted variant. There is one level, so there is no
    FPN level assignment.
    """

    def __init__(
        self,
        output_size: int,
        spatial_scale: float,
        sampling_ratio: int,
        pooler_type: str = "ROIAlignV2",
    ):
        super().__init__()
        if pooler_type not in ("ROIAlignV2", "ROIAlign"):
            raise ValueError(f"POOLER_TYPE {pooler_type!r} is not supported (ROIAlignV2, ROIAlign)")
        self.output_size = (output_size, output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = pooler_type == "ROIAlignV2"

    def forward(self, feature: torch.Tensor, boxes: List[torch.Tensor]) -> torch.Tensor:
        """``boxes[i]`` are image i's ``[R_i, 4]`` boxes; returns ``[sum R_i, C, S, S]``."""
        rois = torch.cat(
            [
                torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1)
                for i, b in enumerate(boxes)
            ],
            dim=0,
        )
        if rois.numel() == 0:
            return feature.new_zeros((0, feature.shape[1], *self.output_size))
        if self._gathers(feature):
            # A bf16/fp16 map under CPU autocast: what torchvision's autocast wrapper does
            # around its float32 kernel (cast in, pool, cast the result back).
            pooled = roi_align_gather(
                feature.float(),
                rois.float(),
                self.output_size[0],
                self.spatial_scale,
                self.sampling_ratio,
                self.aligned,
            )
            return pooled.to(feature.dtype)
        return roi_align(
            feature,
            rois.to(feature.dtype),
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
        )

    def _gathers(self, feature: torch.Tensor) -> bool:
        """Fixed-sampling poolers on CPU maps that torchvision pools with its float32 kernel
        (float32, or bf16/fp16 under autocast), without autograd, run that kernel as row gathers
        (layers/roi_align_gather.py): the same values, 3-10x faster."""
        float32_kernel = feature.dtype == torch.float32 or (
            feature.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled("cpu")
        )
        return (
            feature.device.type == "cpu"
            and float32_kernel
            and not (torch.is_grad_enabled() and feature.requires_grad)
            and gather_pays_off(self.sampling_ratio, feature.shape[1])
        )
