"""gridfeats.structures: box helpers (no "+1", clip to [0, w] x [0, h]) and ImageList padding.

Values are worked out by hand from docs/detectron2-facts.md 2.4, 5.3, 5.6 and 6.6.
"""

from __future__ import annotations

import pytest
import torch

from gridfeats.structures import (
    ImageList,
    box_area,
    clip_boxes_,
    nonempty,
    pairwise_iou,
    scale_boxes_,
)


def test_box_area_has_no_plus_one():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [2.0, 3.0, 2.0, 9.0], [1.5, 1.0, 2.0, 3.0]])
    assert box_area(boxes).tolist() == [50.0, 0.0, 1.0]


def test_clip_boxes_in_place_x_to_width_y_to_height():
    boxes = torch.tensor([[-5.0, -1.0, 120.0, 30.0], [10.0, 70.0, 20.0, 90.0]])
    out = clip_boxes_(boxes, (60, 100))  # (h, w)
    assert out is boxes
    assert boxes.tolist() == [[0.0, 0.0, 100.0, 30.0], [10.0, 60.0, 20.0, 60.0]]


def test_nonempty_is_strict_on_width_and_height():
    boxes = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [5.0, 5.0, 4.0, 6.0]]
    )
    assert nonempty(boxes).tolist() == [True, False, False, False]
    assert nonempty(boxes, threshold=1.0).tolist() == [False, False, False, False]


def test_pairwise_iou_hand_values_and_zero_for_disjoint_or_empty():
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor(
        [[2.0, 2.0, 6.0, 6.0], [4.0, 0.0, 8.0, 4.0], [0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
    )
    iou = pairwise_iou(a, b)
    assert iou.shape == (2, 4)
    # [0,4]^2 vs [2,6]^2: inter 4, union 28. Touching edges: 0. Half box: 8/16. Empty: 0 (not NaN).
    torch.testing.assert_close(iou[0], torch.tensor([4 / 28, 0.0, 0.5, 0.0]))
    assert iou[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_scale_boxes_per_axis_in_place():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out = scale_boxes_(boxes, 0.5, 2.0)
    assert out is boxes and boxes.tolist() == [[5.0, 40.0, 15.0, 80.0]]


def test_image_list_pads_bottom_right_with_value_and_keeps_sizes():
    a = torch.ones(3, 2, 5)
    b = torch.full((3, 4, 3), 2.0)
    batch = ImageList.from_tensors([a, b], pad_value=-1.0)
    assert batch.tensor.shape == (2, 3, 4, 5)
    assert batch.image_sizes == [(2, 5), (4, 3)]
    assert len(batch) == 2
    assert torch.equal(batch.tensor[0, :, :2, :], a)
    assert torch.all(batch.tensor[0, :, 2:, :] == -1.0)  # bottom
    assert torch.equal(batch.tensor[1, :, :, :3], b)
    assert torch.all(batch.tensor[1, :, :, 3:] == -1.0)  # right
    # Default padding value is 0 (the mean colour after normalisation).
    assert ImageList.from_tensors([a, b]).tensor[0, 0, 3, 0].item() == 0.0


def test_image_list_single_image_is_not_padded_and_divisibility_rounds_up():
    a = torch.randn(3, 7, 9)
    one = ImageList.from_tensors([a])
    assert one.tensor.shape == (1, 3, 7, 9) and torch.equal(one.tensor[0], a)
    rounded = ImageList.from_tensors([a], size_divisibility=4)
    assert rounded.tensor.shape == (1, 3, 8, 12) and rounded.image_sizes == [(7, 9)]


def test_image_list_refuses_empty_input():
    with pytest.raises(ValueError, match="at least one image"):
        ImageList.from_tensors([])
