"""RPN test-time proposal selection (docs/detectron2-facts.md 5.1, 5.4, 5.5) on hand-made examples.

Selection per image: sort logits, keep the top PRE_NMS_TOPK, drop non-finite, clip to the (unpadded)
image, drop empty boxes, NMS 0.7, keep the top POST_NMS_TOPK; never across the batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from gridfeats.config import get_cfg
from gridfeats.layers import ShapeSpec
from gridfeats.modeling.rpn import RPN
from gridfeats.structures import ImageList

NAN = math.nan


def _rpn(pre: int = 6000, post: int = 1000, channels: int = 2) -> RPN:
    cfg = get_cfg(
        "R-50-grid",
        opts=["MODEL.RPN.PRE_NMS_TOPK_TEST", str(pre), "MODEL.RPN.POST_NMS_TOPK_TEST", str(post)],
    )
    return RPN(cfg, {"res5": ShapeSpec(channels, 16)}).eval()


# Image (h, w) = (50, 100). Index: box, logit, fate.
CANDIDATES = [
    ((10.0, 10.0, 40.0, 40.0), 5.0),  # 0: best finite box, kept
    ((11.0, 10.0, 41.0, 40.0), 4.0),  # 1: IoU 870/930 = 0.94 with 0 -> suppressed
    ((-20.0, -20.0, -5.0, 30.0), 3.0),  # 2: clipped to x in [0, 0] -> empty -> dropped
    ((60.0, 5.0, 130.0, 45.0), 2.0),  # 3: clipped to (60, 5, 100, 45), kept
    ((0.0, 0.0, NAN, 10.0), 6.0),  # 4: highest logit but not finite -> dropped
    ((70.0, 0.0, 90.0, 20.0), 1.0),  # 5: IoU 300/1700 with clipped 3 -> kept
    ((0.0, 30.0, 20.0, 50.0), 0.5),  # 6: lowest logit: only inside a pre-NMS top-k of 8
    ((10.0, 10.0, 55.0, 40.0), 3.5),  # 7: IoU 900/1350 = 0.67 with 0 -> kept at 0.7 (not at 0.5)
]
IMAGE_HW = (50, 100)


def _as_tensors(cands):
    boxes = torch.tensor([b for b, _ in cands], dtype=torch.float32)
    logits = torch.tensor([s for _, s in cands], dtype=torch.float32)
    return boxes, logits


def test_selection_hand_example_clip_nonempty_nms_and_topk():
    boxes, logits = _as_tensors(CANDIDATES)
    # Pre-NMS top 7 of 8 drops candidate 6; post-NMS top 3 keeps 0, 7, 3 of survivors 0, 7, 3, 5.
    (props,) = _rpn(pre=7, post=3).select_proposals(boxes[None].clone(), logits[None], [IMAGE_HW])
    assert props.proposal_boxes.tolist() == [
        [10.0, 10.0, 40.0, 40.0],
        [10.0, 10.0, 55.0, 40.0],
        [60.0, 5.0, 100.0, 45.0],
    ]
    assert props.objectness_logits.tolist() == [5.0, 3.5, 2.0]

    (props,) = _rpn(pre=7, post=10).select_proposals(boxes[None].clone(), logits[None], [IMAGE_HW])
    assert props.objectness_logits.tolist() == [5.0, 3.5, 2.0, 1.0]

    (props,) = _rpn(pre=8, post=10).select_proposals(boxes[None].clone(), logits[None], [IMAGE_HW])
    assert props.objectness_logits.tolist() == [5.0, 3.5, 2.0, 1.0, 0.5]
    assert props.proposal_boxes[-1].tolist() == [0.0, 30.0, 20.0, 50.0]


def test_nms_threshold_comes_from_the_config():
    boxes, logits = _as_tensors(CANDIDATES)
    cfg = get_cfg("R-50-grid", opts=["MODEL.RPN.NMS_THRESH", "0.5"])
    rpn = RPN(cfg, {"res5": ShapeSpec(2, 16)}).eval()
    (props,) = rpn.select_proposals(boxes[None].clone(), logits[None], [IMAGE_HW])
    assert props.objectness_logits.tolist() == [
        5.0,
        2.0,
        1.0,
        0.5,
    ]  # 7 (IoU 0.67) is now suppressed


def test_each_image_of_a_batch_is_selected_independently():
    boxes_a, logits_a = _as_tensors(CANDIDATES)
    # Image b: a very confident box on top of image a's best box, and a smaller image (other clips).
    boxes_b, logits_b = _as_tensors(
        [
            ((10.0, 10.0, 40.0, 40.0), 9.0),
            ((12.0, 10.0, 40.0, 40.0), 8.0),
            ((0.0, 0.0, 90.0, 30.0), 1.0),
            ((50.0, 0.0, 60.0, 10.0), 0.0),
            ((5.0, 5.0, 6.0, 6.0), -1.0),
            ((20.0, 20.0, 30.0, 30.0), -2.0),
            ((70.0, 10.0, 80.0, 20.0), -3.0),
            ((1.0, 1.0, 2.0, 2.0), -4.0),
        ]
    )
    sizes = [IMAGE_HW, (25, 40)]
    rpn = _rpn(pre=7, post=10)
    batch = rpn.select_proposals(
        torch.stack([boxes_a, boxes_b]), torch.stack([logits_a, logits_b]), sizes
    )
    alone_a = rpn.select_proposals(boxes_a[None].clone(), logits_a[None], [sizes[0]])[0]
    alone_b = rpn.select_proposals(boxes_b[None].clone(), logits_b[None], [sizes[1]])[0]
    assert torch.equal(batch[0].proposal_boxes, alone_a.proposal_boxes) and torch.equal(
        batch[0].objectness_logits, alone_a.objectness_logits
    )
    assert torch.equal(batch[1].proposal_boxes, alone_b.proposal_boxes) and torch.equal(
        batch[1].objectness_logits, alone_b.objectness_logits
    )
    # Image a keeps its best box although image b has an overlapping, higher-scoring one.
    assert batch[0].proposal_boxes[0].tolist() == [10.0, 10.0, 40.0, 40.0]
    # Image b is clipped to its own size (w 40, h 25), not the batch's largest: (50,0,60,10) and
    # (70,10,80,20) become empty; its 8th box is outside the pre-NMS top 7.
    assert batch[1].proposal_boxes.tolist() == [
        [10.0, 10.0, 40.0, 25.0],
        [0.0, 0.0, 40.0, 25.0],
        [5.0, 5.0, 6.0, 6.0],
        [20.0, 20.0, 30.0, 25.0],
    ]
    assert batch[1].objectness_logits.tolist() == [9.0, 1.0, -1.0, -2.0]


def test_forward_aligns_logits_deltas_and_anchors():
    """Objectness ``[A, H, W]`` and deltas ``[A*4, H, W]`` (channel ``4a + k``) are flattened as
    ``(y, x, a)``, the anchor order: one hand-placed activation must decode to one known box."""
    rpn = _rpn(channels=2)
    head = rpn.rpn_head
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.zero_()
        head.conv.weight[0, 0, 1, 1] = 1.0  # t = relu(x) on channel 0
        head.objectness_logits.weight.zero_()
        head.objectness_logits.weight[4, 0, 0, 0] = (
            1.0  # anchor 4 (size 64, ratio 1) reads channel 0
        )
        head.objectness_logits.bias.fill_(-1.0)
        head.objectness_logits.bias[4] = 0.0
        head.anchor_deltas.weight.zero_()
        head.anchor_deltas.bias.zero_()
        head.anchor_deltas.bias[4 * 4 + 0] = 0.5  # dx of anchor 4: +0.5 widths = +32 px
    feature = torch.zeros(1, 2, 3, 4)
    feature[0, 0, 1, 2] = 5.0  # cell y = 1, x = 2
    images = ImageList(torch.zeros(1, 3, 48, 64), [(48, 64)])
    (props,), losses = rpn(images, {"res5": feature})
    assert losses == {}
    # Anchor (-32,-32,32,32) at cell (1, 2) -> (0,-16,64,48); dx shifts by 32 -> (32,-16,96,80);
    # clipped to the 48 x 64 image -> (32, 0, 64, 48).
    assert props.objectness_logits[0].item() == 5.0
    assert props.proposal_boxes[0].tolist() == [32.0, 0.0, 64.0, 48.0]
    assert torch.all(props.objectness_logits[1:] <= 0.0)
    assert torch.all(props.objectness_logits[:-1] >= props.objectness_logits[1:])
    assert len(props.proposal_boxes) <= 3 * 4 * 15


@pytest.mark.parametrize("pre,post", [(3, 1000), (6000, 2)])
def test_forward_respects_topk_settings(pre, post):
    torch.manual_seed(0)
    rpn = _rpn(pre=pre, post=post, channels=2)
    images = ImageList(torch.zeros(1, 3, 96, 128), [(96, 128)])
    (props,), _ = rpn(images, {"res5": torch.rand(1, 2, 6, 8)})
    assert 0 < len(props.proposal_boxes) <= min(pre, post)
    assert props.proposal_boxes.shape[1] == 4 and props.objectness_logits.shape == (
        len(props.proposal_boxes),
    )
