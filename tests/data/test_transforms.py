"""Test-time resize (docs/detectron2-facts.md 2.2) and the image -> network-input step on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gridfeats.data.image_io import read_image
from gridfeats.data.preprocess import prepare_image, prepare_rgb
from gridfeats.data.transforms import resize_shortest_edge_size, resize_uint8


def _hand_size(h: int, w: int, short: int = 600, max_size: int = 1000):
    """The spec's formula, written out independently (Python doubles, round half up)."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        k = max_size / max(newh, neww)
        newh, neww = newh * k, neww * k
    return int(newh + 0.5), int(neww + 0.5)


@pytest.mark.parametrize(
    "hw,expected",
    [
        ((480, 640), (600, 800)),
        ((375, 500), (600, 800)),
        ((333, 500), (600, 901)),  # 900.9 rounds up
        ((300, 1000), (300, 1000)),  # short side 600 would make the long side 2000: scaled by 0.5
        ((1, 1), (600, 600)),
        ((872, 523), (1000, 600)),  # portrait hitting the 1000 cap: 599.77 -> 600
        ((512, 512), (600, 600)),  # square
        ((500, 741), (600, 889)),
        ((1000, 300), (1000, 300)),
    ],
)
def test_resize_sizes_spec_examples(hw, expected):
    assert resize_shortest_edge_size(*hw, 600, 1000) == expected
    assert _hand_size(*hw) == expected


def test_resize_sizes_agree_with_the_formula_on_many_shapes():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, size=(500, 2)):
        assert resize_shortest_edge_size(int(h), int(w), 600, 1000) == _hand_size(int(h), int(w))
    assert resize_shortest_edge_size(64, 96, 64, 96) == (64, 96)
    assert resize_shortest_edge_size(37, 53, 0, 1000) == (37, 53)  # short side 0: no-op


@pytest.mark.parametrize("newh,neww", [(12, 17), (80, 131), (33, 40)])
def test_resize_is_pil_bilinear_on_uint8(newh, neww):
    img = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = resize_uint8(img, newh, neww)
    expected = np.asarray(Image.fromarray(img).resize((neww, newh), Image.BILINEAR))
    assert out.dtype == np.uint8 and out.shape == (newh, neww, 3)
    np.testing.assert_array_equal(out, expected)
    # Not torch's bilinear (which differs at borders and does not anti-alias when shrinking).
    torch_out = (
        F.interpolate(
            torch.from_numpy(img).permute(2, 0, 1)[None].float(),
            size=(newh, neww),
            mode="bilinear",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .round()
        .clamp(0, 255)
    )
    assert not np.array_equal(out, torch_out.to(torch.uint8).numpy())


def test_resize_same_size_is_identity_and_non_uint8_is_refused():
    img = np.zeros((5, 6, 3), np.uint8)
    assert resize_uint8(img, 5, 6) is img
    with pytest.raises(TypeError, match="uint8"):
        resize_uint8(img.astype(np.float32), 10, 12)


def test_prepare_rgb_reverses_to_bgr_and_resizes():
    rgb = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    prepared = prepare_rgb(rgb, 60, 100)
    assert prepared.orig_hw == (30, 40) and prepared.input_hw == (60, 80)
    assert prepared.image.dtype == torch.uint8 and prepared.image.shape == (3, 60, 80)
    expected = np.asarray(
        Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1])).resize((80, 60), Image.BILINEAR)
    )
    np.testing.assert_array_equal(prepared.image.numpy(), expected.transpose(2, 0, 1))
    same = prepare_rgb(rgb, 30, 1000, input_format="RGB")
    np.testing.assert_array_equal(same.image.numpy(), rgb.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        prepare_rgb(rgb, 60, 100, input_format="YUV")


def test_prepare_image_reads_then_prepares(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    from_path = prepare_image(tmp_path / "x.png", 42, 1000)
    direct = prepare_rgb(read_image(tmp_path / "x.png"), 42, 1000)
    assert from_path.input_hw == direct.input_hw == (42, 68) and from_path.orig_hw == (21, 34)
    assert torch.equal(from_path.image, direct.image)
