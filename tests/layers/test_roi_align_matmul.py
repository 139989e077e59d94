"""RoIAlign by matmul (gridfeats/layers/roi_align_matmul.py): torchvision's roi_align up to float
rounding, for the sampling cases the fast mode sends it, and only those."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from gridfeats.layers import roi_align_matmul
from gridfeats.layers.roi_align_matmul import matmul_pays_off, roi_align_by_matmul
from gridfeats.modeling.roi_heads.pooler import ROIPooler


def _rois(count: int, images: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Boxes in input pixels (stride 16) of every kind: inside, crossing or beyond the border,
    sub-cell small, larger than the map."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=g) * torch.tensor([width * 16 + 64, height * 16 + 64])
    corner = corner - 32
    size = torch.rand(count, 2, generator=g) ** 2 * 400 + 0.05
    batch = torch.randint(0, images, (count, 1), generator=g).float()
    return torch.cat([batch, corner, corner + size], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size, sampling_ratio", [(1, 2), (2, 2), (3, 1), (2, 3)])
def test_equals_torchvision_roi_align_up_to_rounding(aligned, output_size, sampling_ratio):
    torch.manual_seed(0)
    feature = torch.randn(3, 32, 17, 23)
    rois = _rois(400, 2, 17, 23, seed=output_size * 10 + sampling_ratio)  # image 2 has no box
    expected = roi_align(feature, rois, output_size, 1 / 16, sampling_ratio, aligned)
    pooled = roi_align_by_matmul(feature, rois, output_size, 1 / 16, sampling_ratio, aligned)
    assert pooled.shape == expected.shape
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)


def test_adaptive_sampling_is_not_accepted():
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_by_matmul(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5), 1, 1.0, 0, True)
    assert not matmul_pays_off(10, 1, 8, 8, 0)
    assert matmul_pays_off(1000, 1, 38, 63, 2)  # R-50-grid's proposals on a 600x1000 image
    assert not matmul_pays_off(1000, 14, 38, 63, 2)  # updn's 14x14 pooler stays on torchvision


def test_pooler_uses_it_only_when_the_fast_mode_asks(monkeypatch):
    calls = []
    real = roi_align_by_matmul

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr("gridfeats.modeling.roi_heads.pooler.roi_align_by_matmul", spy)
    pooler = ROIPooler(1, 1 / 16, 2)
    feature = torch.randn(1, 8, 10, 12)
    boxes = [_rois(50, 1, 10, 12, seed=3)[:, 1:]]
    exact = pooler(feature, boxes)
    assert calls == []
    pooler.matmul_pooling = True
    torch.testing.assert_close(pooler(feature, boxes), exact, rtol=1e-5, atol=1e-6)
    assert calls == [50]
    monkeypatch.setattr(roi_align_matmul, "MAX_WEIGHT_ELEMENTS", 10)  # too large a matrix
    assert torch.equal(pooler(feature, boxes), exact) and calls == [50]
