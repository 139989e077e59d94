"""RoIAlign by row gathers (gridfeats/layers/roi_align_gather.py): torchvision's CPU roi_align
value for value, and the pooler sends it exactly the cases it reproduces."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from gridfeats.layers import roi_align_gather
from gridfeats.layers.roi_align_gather import gather_pays_off
from gridfeats.layers.roi_align_gather import roi_align_gather as gather
from gridfeats.modeling.roi_heads.pooler import ROIPooler


def _rois(count: int, images: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Boxes in input pixels (stride 16) of every kind: inside, crossing or beyond the border,
    sub-cell small, larger than the map, degenerate (x2 < x1)."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=g) * torch.tensor([width * 16 + 64, height * 16 + 64])
    corner = corner - 32
    size = torch.rand(count, 2, generator=g) ** 2 * 400 + 0.05
    size[:5] = -size[:5]
    batch = torch.randint(0, images, (count, 1), generator=g).float()
    return torch.cat([batch, corner, corner + size], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size, sampling_ratio", [(1, 2), (2, 2), (3, 1), (2, 3), (14, 2)])
def test_equals_torchvision_roi_align_exactly(aligned, output_size, sampling_ratio):
    torch.manual_seed(0)
    feature = torch.randn(3, 32, 17, 23) * 4
    rois = _rois(300, 2, 17, 23, seed=output_size * 10 + sampling_ratio)  # image 2 has no box
    expected = roi_align(feature, rois, output_size, 1 / 16, sampling_ratio, aligned)
    pooled = gather(feature, rois, output_size, 1 / 16, sampling_ratio, aligned)
    assert pooled.shape == expected.shape and pooled.is_contiguous()
    assert torch.equal(pooled, expected)


def test_chunks_and_buffer_reuse_change_nothing(monkeypatch):
    torch.manual_seed(1)
    feature = torch.randn(2, 16, 9, 11)
    rois = _rois(101, 2, 9, 11, seed=5)
    expected = roi_align(feature, rois, 2, 1 / 16, 2, True)
    monkeypatch.setattr(roi_align_gather, "CHUNK_ELEMENTS", 16 * 2 * 2 * 4 * 7)  # 7 boxes a chunk
    assert torch.equal(gather(feature, rois, 2, 1 / 16, 2, True), expected)


def test_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="sampling_ratio"):
        gather(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5), 1, 1.0, 0, True)
    with pytest.raises(ValueError, match="float32"):
        gather(torch.zeros(1, 2, 4, 4, dtype=torch.float64), torch.zeros(1, 5), 1, 1.0, 2, True)
    assert not gather_pays_off(0, 2048)  # adaptive sampling (X-152-challenge)
    assert gather_pays_off(2, 2048) and gather_pays_off(2, 1024)  # R-50-grid, updn
    assert not gather_pays_off(2, 32)


def test_pooler_gathers_at_inference_and_keeps_torchvision_for_autograd(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return gather(*args, **kwargs)

    monkeypatch.setattr("gridfeats.modeling.roi_heads.pooler.roi_align_gather", spy)
    pooler = ROIPooler(2, 1 / 16, 2)
    feature = torch.randn(1, 256, 10, 12)
    boxes = [_rois(50, 1, 10, 12, seed=3)[:, 1:]]
    rois = torch.cat([torch.zeros(50, 1), boxes[0]], dim=1)
    expected = roi_align(feature, rois, 2, 1 / 16, 2, True)
    with torch.inference_mode():
        assert torch.equal(pooler(feature, boxes), expected)
    assert calls == [50]
    trained = feature.clone().requires_grad_(True)
    pooled = pooler(trained, boxes)
    assert calls == [50] and pooled.requires_grad
    pooled.sum().backward()
    assert trained.grad is not None
    # bf16 under CPU autocast: torchvision casts to float32 around its kernel, and so does this.
    low = feature.bfloat16()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = roi_align(low, rois, 2, 1 / 16, 2, True)
        pooled = pooler(low, boxes)
    assert calls == [50, 50] and pooled.dtype == torch.bfloat16 and torch.equal(pooled, reference)
    del calls[1:]
    with torch.inference_mode():
        pooler(feature.double(), boxes)  # float64 and narrow maps: torchvision's kernel
        pooler(feature[:, :32], boxes)
    assert calls == [50]
