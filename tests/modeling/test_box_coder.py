"""Box2BoxTransform (docs/detectron2-facts.md 5.3): no "+1", weights, upper clamp on dw/dh only,
float32 order."""

from __future__ import annotations

import math

import numpy as np
import torch

from gridfeats.modeling.box_coder import SCALE_CLAMP, Box2BoxTransform

ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def test_scale_clamp_is_log_1000_over_16():
    assert SCALE_CLAMP == math.log(1000.0 / 16)
    assert abs(SCALE_CLAMP - 4.135166556742356) < 1e-15


def test_encode_hand_example_without_plus_one():
    # Source: w 20, h 40, centre (20, 40). Target: w 40, h 80, centre (35, 50).
    src = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    tgt = torch.tensor([[15.0, 10.0, 55.0, 90.0]])
    deltas = Box2BoxTransform(ROI_WEIGHTS).get_deltas(src, tgt)
    expected = torch.tensor([[10 * 15 / 20, 10 * 10 / 40, 5 * math.log(2), 5 * math.log(2)]])
    torch.testing.assert_close(deltas, expected, rtol=1e-6, atol=1e-6)
    unweighted = Box2BoxTransform((1.0, 1.0, 1.0, 1.0)).get_deltas(src, tgt)
    torch.testing.assert_close(
        unweighted, torch.tensor([[0.75, 0.25, math.log(2), math.log(2)]]), rtol=1e-6, atol=1e-6
    )


def test_decode_hand_example():
    src = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    deltas = torch.tensor([[7.5, 2.5, 5 * math.log(2), 5 * math.log(2)]])
    out = Box2BoxTransform(ROI_WEIGHTS).apply_deltas(deltas, src)
    torch.testing.assert_close(out, torch.tensor([[15.0, 10.0, 55.0, 90.0]]), rtol=0, atol=1e-4)


def test_encode_decode_round_trip_with_roi_weights():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 500
    src = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 200 + 1], dim=1)
    xy2 = xy + torch.randn(200, 2, generator=g) * 20
    tgt = torch.cat([xy2, xy2 + torch.rand(200, 2, generator=g) * 200 + 1], dim=1)
    coder = Box2BoxTransform(ROI_WEIGHTS)
    torch.testing.assert_close(
        coder.apply_deltas(coder.get_deltas(src, tgt), src), tgt, rtol=0, atol=1e-3
    )


def test_upper_clamp_on_dw_dh_only():
    src = torch.tensor([[0.0, 0.0, 16.0, 8.0]])  # w 16, h 8, centre (8, 4)
    coder = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    # dw, dh = 100 are clamped to log(1000/16): sizes become 1000 and 500 exactly (up to float32).
    big = coder.apply_deltas(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), src)
    torch.testing.assert_close(
        big, torch.tensor([[8 - 500.0, 4 - 250.0, 8 + 500.0, 4 + 250.0]]), rtol=1e-5, atol=1e-3
    )
    # Negative dw/dh are not clamped (no lower bound): a box centred on 0 shrinks by exp(-20).
    centred = torch.tensor([[-8.0, -4.0, 8.0, 4.0]])
    small = coder.apply_deltas(torch.tensor([[0.0, 0.0, -20.0, -20.0]]), centred)
    w = (small[0, 2] - small[0, 0]).item()
    assert 0 < w < 1e-6 and abs(w - 16 * math.exp(-20)) < 1e-12
    # dx/dy are never clamped: a shift of 100 widths moves the centre by 1600 px.
    far = coder.apply_deltas(torch.tensor([[100.0, -100.0, 0.0, 0.0]]), src)
    torch.testing.assert_close(
        far, torch.tensor([[1600.0, -800.0, 1616.0, -792.0]]), rtol=0, atol=1e-3
    )
    # With ROI weights the clamp applies after the division by the weight (5).
    roi = Box2BoxTransform(ROI_WEIGHTS).apply_deltas(
        torch.tensor([[0.0, 0.0, 5 * 4.0, 5 * 100.0]]), src
    )
    torch.testing.assert_close(
        roi[0, 2] - roi[0, 0], torch.tensor(16 * math.exp(4.0)), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        roi[0, 3] - roi[0, 1], torch.tensor(8 * 1000 / 16), rtol=1e-5, atol=0
    )


def test_decode_float32_operation_order_is_bit_exact():
    """Spec order: dx = d / wx (a division), pcx = dx * w + cx, x0 = pcx - 0.5 * pw (float32)."""
    f = np.float32
    box = np.array([13.7, 21.3, 97.1, 64.9], dtype=f)
    d = np.array(
        [1.2388431, -0.7391, 0.0, 0.0], dtype=f
    )  # dw = dh = 0 keeps exp() out of the comparison
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + f(0.5) * w, box[1] + f(0.5) * h
    pcx, pcy = (d[0] / f(10)) * w + cx, (d[1] / f(10)) * h + cy
    pw, ph = np.exp(d[2] / f(5)) * w, np.exp(d[3] / f(5)) * h
    expected = np.array(
        [pcx - f(0.5) * pw, pcy - f(0.5) * ph, pcx + f(0.5) * pw, pcy + f(0.5) * ph], dtype=f
    )
    out = Box2BoxTransform(ROI_WEIGHTS).apply_deltas(
        torch.from_numpy(d[None]), torch.from_numpy(box[None])
    )
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), expected)
    # The example discriminates: multiplying by 1/10 instead of dividing gives another float32.
    assert (d[0] * f(0.1)) * w + cx != pcx


def test_class_specific_decode_applies_the_same_box_to_each_group_of_four():
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 15.0, 25.0]])
    per_class = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    coder = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    out = coder.apply_deltas(per_class, src)
    assert out.shape == (2, 12)
    for k in range(3):
        torch.testing.assert_close(
            out[:, 4 * k : 4 * k + 4], coder.apply_deltas(per_class[:, 4 * k : 4 * k + 4], src)
        )
    assert out[0].tolist() == [10.0, 0.0, 20.0, 20.0, 0.0, 40.0, 10.0, 60.0, 0.0, 0.0, 10.0, 20.0]
    assert out[1, 4:8].tolist() == [-5.0, 5.0, 5.0, 25.0]
