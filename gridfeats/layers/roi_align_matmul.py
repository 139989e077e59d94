"""RoIAlign as one matmul per image, for the fast mode's small poolers.

Why: torchvision's CPU ``roi_align`` reads each bilinear sample's four corners from every channel
plane of an NCHW map; on R-50-grid's 2048-channel stride-16 map that is millions of scattered
reads (about 200 ms for 1000 proposals at 1x1 output, more than the two box-head FC layers it
feeds). A pooled value is a fixed linear combination of map cells, so all of an image's outputs
are ``weights [R * S * S, H * W] @ map [H * W, C]``: one dense matmul (streaming the map once)
after building ``weights`` from the boxes. The same sampling rules as torchvision's kernel
(``aligned`` half-pixel shift, samples outside ``[-1, size]`` dropped, edge clamping, the mean over
``sampling_ratio``^2 samples per bin), so the results differ by float rounding only.

Used where the weight matrix stays small (:func:`matmul_pays_off`): 1x1-2x2 poolers over a few
hundred to a few thousand boxes. Large poolers (updn's 14x14) keep torchvision's kernel.
"""

from __future__ import annotations

import torch

MAX_WEIGHT_ELEMENTS = 1 << 24  # 64 MiB of float32 weights per image


def matmul_pays_off(
    num_boxes: int, output_size: int, height: int, width: int, sampling_ratio: int
) -> bool:
    """Fixed sampling (``sampling_ratio > 0``) and a weight matrix of at most 16M entries."""
    elements = num_boxes * output_size * output_size * height * width
    return sampling_ratio > 0 and elements <= MAX_WEIGHT_ELEMENTS


def _axis_weights(
    start: torch.Tensor, bin_size: torch.Tensor, output_size: int, samples: int, length: int
) -> torch.Tensor:
    """``[R, S, length]``: each output bin's mean bilinear weight on each cell along one axis."""
    device, dtype = start.device, start.dtype
    bins = torch.arange(output_size, device=device, dtype=dtype)
    steps = torch.arange(samples, device=device, dtype=dtype) + 0.5
    # [R, S, samples] sample coordinates in torchvision's order of operations:
    # start + bin * bin_size + (i + 0.5) * bin_size / samples
    bin_size = bin_size[:, None, None]
    coords = start[:, None, None] + bins[None, :, None] * bin_size
    coords = coords + steps[None, None, :] * bin_size / samples
    inside = (coords >= -1.0) & (coords <= length)
    coords = coords.clamp(min=0.0)
    low = coords.floor().long()
    at_edge = low >= length - 1
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coords), coords - low.to(dtype))
    weights = torch.zeros(*coords.shape[:2], length, device=device, dtype=dtype)
    keep = inside.to(dtype)
    weights.scatter_add_(2, low, (1.0 - frac) * keep)
    weights.scatter_add_(2, high, frac * keep)
    return weights / samples


def roi_align_by_matmul(
    feature: torch.Tensor,
    rois: torch.Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(feature, rois, output_size, spatial_scale, sampling_ratio,
    aligned)`` for ``rois [K, 5]`` (batch index, x1, y1, x2, y2) and ``sampling_ratio > 0``;
    returns ``[K, C, S, S]``."""
    if sampling_ratio <= 0:
        raise ValueError("roi_align_by_matmul needs a fixed sampling_ratio > 0")
    n, c, h, w = feature.shape
    s = output_size
    out = feature.new_zeros((len(rois), c, s, s))
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].to(torch.float32) * spatial_scale - offset
    size_w = boxes[:, 2] - boxes[:, 0]
    size_h = boxes[:, 3] - boxes[:, 1]
    if not aligned:  # the legacy op forces boxes to at least one cell
        size_w, size_h = size_w.clamp(min=1.0), size_h.clamp(min=1.0)
    batch = rois[:, 0].long()
    for image in range(n):
        index = (batch == image).nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        wy = _axis_weights(boxes[index, 1], size_h[index] / s, s, sampling_ratio, h)
        wx = _axis_weights(boxes[index, 0], size_w[index] / s, s, sampling_ratio, w)
        # [R, S, S, H, W] -> [R*S*S, H*W], the outer product of the two axes' weights
        weights = (wy[:, :, None, :, None] * wx[:, None, :, None, :]).reshape(-1, h * w)
        cells = feature[image].reshape(c, h * w).to(weights.dtype)
        pooled = torch.mm(weights, cells.t())  # [R*S*S, C]
        out[index] = pooled.view(len(index), s, s, c).permute(0, 3, 1, 2).to(feature.dtype)
    return out
