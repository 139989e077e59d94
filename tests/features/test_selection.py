"""Bottom-up-attention region selection against a literal re-implementation of generate_tsv.py.

The reference below loops over every class with a full NMS, exactly as bottom-up-attention's
``get_detections_from_im`` does; the production code prunes pairs below a score floor for speed.
Random box sets at several score scales exercise all three branches (threshold decides, too few
-> min_boxes, too many -> max_boxes); the two must pick the same proposals, in the same order,
with the same confidences and classes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import nms

from gridfeats.features.selection import BottomUpSettings, select_bottom_up, top_attributes
from gridfeats.modeling.postprocessing import rescale_boxes
from gridfeats.structures import Instances


def random_predictions(
    seed: int, num_proposals: int, num_classes: int, sharpness: float, image_hw=(200, 300)
) -> Instances:
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    xy = torch.rand(num_proposals, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 5 + torch.rand(num_proposals, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
    proposals = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], dim=1)
    logits = torch.randn(num_proposals, num_classes + 1, generator=g) * sharpness
    probs = torch.softmax(logits, dim=1)
    jitter = torch.randn(num_proposals, num_classes, 4, generator=g) * 6
    boxes = (proposals[:, None, :] + jitter).reshape(num_proposals, num_classes * 4)
    features = torch.randn(num_proposals, 8, generator=g)
    return Instances(
        image_hw,
        proposal_boxes=proposals,
        box_features=features,
        class_probs=probs,
        pred_boxes_per_class=boxes,
    )


def reference_generate_tsv(pred: Instances, settings: BottomUpSettings, image_hw):
    """generate_tsv.py's loop, written out plainly (background is the last column here)."""
    scores = pred.class_probs[:, :-1]
    num_proposals, num_classes = scores.shape
    max_conf = np.zeros(num_proposals)
    best = np.full(num_proposals, -1)
    for c in range(num_classes):
        if settings.boxes == "proposals":
            boxes = pred.proposal_boxes
        else:
            boxes = pred.pred_boxes_per_class.reshape(num_proposals, num_classes, 4)[:, c].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_hw[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_hw[0])
        keep = nms(boxes, scores[:, c], settings.nms_thresh).numpy()
        class_scores = scores[keep, c].numpy()
        better = class_scores > max_conf[keep]
        max_conf[keep[better]] = class_scores[better]
        best[keep[better]] = c
    keep_boxes = np.where(max_conf >= settings.score_thresh)[0]
    ranked = np.argsort(-max_conf, kind="stable")
    if len(keep_boxes) < settings.min_boxes:
        keep_boxes = ranked[: settings.min_boxes]
    elif len(keep_boxes) > settings.max_boxes:
        keep_boxes = ranked[: settings.max_boxes]
    return keep_boxes, max_conf[keep_boxes], best[keep_boxes]


CASES = [
    # (seed, proposals, classes, sharpness): sharp logits -> many confident boxes, flat -> none
    (0, 300, 20, 4.0),
    (1, 300, 20, 2.5),
    (2, 120, 30, 1.0),
    (3, 200, 12, 3.0),
    (4, 8, 10, 0.5),  # fewer proposals than min_boxes
    (5, 400, 50, 3.5),
]


@pytest.mark.parametrize("box_source", ["proposals", "regressed"])
def test_bottom_up_selection_matches_generate_tsv(box_source):
    image_hw = (200, 300)
    branches = set()
    for seed, num_proposals, num_classes, sharpness in CASES:
        for settings in (
            BottomUpSettings(boxes=box_source),
            BottomUpSettings(score_thresh=0.2, min_boxes=36, max_boxes=36, boxes=box_source),
        ):
            pred = random_predictions(seed, num_proposals, num_classes, sharpness, image_hw)
            pick = select_bottom_up(pred, settings)
            index, conf, best = reference_generate_tsv(pred, settings, image_hw)
            assert pick.proposal_index.tolist() == index.tolist(), (seed, settings)
            np.testing.assert_allclose(pick.scores.numpy(), conf, rtol=0, atol=0)
            assert pick.pred_classes.tolist() == best.tolist()
            passing = int((conf >= settings.score_thresh).sum())
            n_pass_all = len(index)
            branches.add(
                "min"
                if n_pass_all == settings.min_boxes and passing < settings.min_boxes
                else "max"
                if n_pass_all == settings.max_boxes
                and passing == settings.max_boxes
                and settings.min_boxes != settings.max_boxes
                else "threshold"
            )
            if box_source == "proposals":
                assert torch.equal(pick.pred_boxes, pred.proposal_boxes[pick.proposal_index])
            else:
                per_class = pred.pred_boxes_per_class.reshape(num_proposals, num_classes, 4)
                expected = per_class[pick.proposal_index, pick.pred_classes]
                expected[:, 0::2] = expected[:, 0::2].clamp(0, image_hw[1])
                expected[:, 1::2] = expected[:, 1::2].clamp(0, image_hw[0])
                assert torch.equal(pick.pred_boxes, expected)
    assert branches == {"min", "threshold", "max"}


def test_bottom_up_counts_follow_the_bounds():
    sharp = random_predictions(0, 300, 20, 6.0)
    flat = random_predictions(1, 300, 20, 0.1)
    settings = BottomUpSettings(score_thresh=0.2, min_boxes=10, max_boxes=50)
    assert len(select_bottom_up(sharp, settings)) == 50  # many pass: capped
    assert len(select_bottom_up(flat, settings)) == 10  # none pass: the 10 best
    fixed = BottomUpSettings(min_boxes=36, max_boxes=36)
    assert len(select_bottom_up(sharp, fixed)) == 36
    assert len(select_bottom_up(flat, fixed)) == 36
    empty = random_predictions(2, 0, 5, 1.0)
    assert len(select_bottom_up(empty, settings)) == 0


def test_when_a_bound_decides_boxes_come_most_confident_first():
    pick = select_bottom_up(random_predictions(1, 300, 20, 0.1), BottomUpSettings())
    assert torch.all(pick.scores[:-1] >= pick.scores[1:])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="min boxes"):
        BottomUpSettings(min_boxes=50, max_boxes=10)
    with pytest.raises(ValueError, match="score threshold"):
        BottomUpSettings(score_thresh=1.5)
    with pytest.raises(ValueError, match="NMS"):
        BottomUpSettings(nms_thresh=0.0)
    with pytest.raises(ValueError, match="boxes"):
        BottomUpSettings(boxes="anchors")


def test_top_attributes_are_sorted_ids_and_probabilities():
    probs = torch.softmax(torch.randn(5, 40, generator=torch.Generator().manual_seed(0)), dim=1)
    ids, scores = top_attributes(probs, 3, 5)
    assert ids.dtype == torch.int32 and scores.dtype == torch.float32
    expected = torch.argsort(probs, dim=1, descending=True)[:, :3]
    assert torch.equal(ids.long(), expected)
    assert torch.equal(scores, torch.gather(probs, 1, expected))
    none_ids, none_scores = top_attributes(None, 0, 4)
    assert none_ids.shape == (4, 0) and none_scores.shape == (4, 0)
    with pytest.raises(ValueError, match="top 50 of 40"):
        top_attributes(probs, 50, 5)


def test_boxes_are_scaled_back_per_axis_and_clipped():
    boxes = torch.tensor([[10.0, 20.0, 60.0, 100.0], [-5.0, 0.0, 200.0, 50.0]])
    out = rescale_boxes(boxes, input_hw=(100, 200), output_hw=(50, 400))
    assert torch.allclose(out[0], torch.tensor([20.0, 10.0, 120.0, 50.0]))
    assert torch.allclose(out[1], torch.tensor([0.0, 0.0, 400.0, 25.0]))
    assert torch.equal(boxes[0], torch.tensor([10.0, 20.0, 60.0, 100.0]))  # input untouched
