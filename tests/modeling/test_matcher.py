"""Detectron2's Matcher and subsample_labels (detectron2-compat.md 5.7, 6.7) on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from gridfeats.modeling.matcher import Matcher
from gridfeats.modeling.sampling import subsample_labels


def _rpn_matcher(low_quality: bool = True) -> Matcher:
    return Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=low_quality)


def test_thresholds_are_half_open_intervals():
    # one gt, predictions at the exact boundaries: [.., 0.3) -> 0, [0.3, 0.7) -> -1, [0.7, ..) -> 1
    iou = torch.tensor([[0.0, 0.29999, 0.3, 0.69999, 0.7, 1.0]])
    matches, labels = _rpn_matcher(low_quality=False)(iou)
    assert labels.dtype == torch.int8 and matches.dtype == torch.int64
    assert labels.tolist() == [0, 0, -1, -1, 1, 1]
    assert matches.tolist() == [0] * 6


def test_low_quality_matches_include_ties_and_keep_their_own_argmax():
    # gt 0's best IoU is 0.4, reached by predictions 1 and 2 (a tie): both become positive.
    # Prediction 2's own best gt is gt 1 (0.5 > 0.4): its match stays 1, not 0.
    iou = torch.tensor(
        [
            [0.1, 0.4, 0.4, 0.0],
            [0.0, 0.2, 0.5, 0.6],
        ]
    )
    matches, labels = _rpn_matcher()(iou)
    # gt 1's best is 0.6 at prediction 3 -> positive too; prediction 0 stays negative
    assert labels.tolist() == [0, 1, 1, 1]
    assert matches.tolist() == [0, 0, 1, 1]
    _, no_lq = _rpn_matcher(low_quality=False)(iou)
    assert no_lq.tolist() == [0, -1, -1, -1]


def test_low_quality_best_of_zero_makes_every_zero_iou_prediction_positive():
    # a gt that overlaps nothing has maximum 0: every prediction with IoU 0 to it is "tied"
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.8, 0.0]])
    _, labels = _rpn_matcher()(iou)
    assert labels.tolist() == [1, 1, 1]


def test_no_ground_truth_gives_first_label_everywhere():
    matches, labels = _rpn_matcher()(torch.zeros(0, 5))
    assert matches.tolist() == [0] * 5 and labels.tolist() == [0] * 5
    roi = Matcher([0.5], [0, 1])
    assert roi(torch.zeros(0, 3))[1].tolist() == [0, 0, 0]


def test_roi_matcher_foreground_at_half():
    iou = torch.tensor([[0.49, 0.5, 0.9], [0.6, 0.2, 0.1]])
    matches, labels = Matcher([0.5], [0, 1])(iou)
    assert labels.tolist() == [1, 1, 1] and matches.tolist() == [1, 0, 0]


@pytest.mark.parametrize(
    "thresholds, labels",
    [([0.0, 0.5], [0, -1, 1]), ([0.7, 0.3], [0, -1, 1]), ([0.5], [0, 2]), ([0.3, 0.7], [0, 1])],
)
def test_bad_matcher_arguments_are_rejected(thresholds, labels):
    with pytest.raises(ValueError):
        Matcher(thresholds, labels)


def test_negative_quality_is_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        _rpn_matcher()(torch.tensor([[-0.1, 0.5]]))


# -- subsample_labels ------------------------------------------------------------------------------


def _labels() -> torch.Tensor:
    # 10 positives (label 1), 50 negatives (0), 40 ignored (-1), interleaved
    labels = torch.full((100,), -1, dtype=torch.int64)
    labels[torch.arange(0, 100, 10)] = 1
    labels[torch.arange(1, 100, 2)] = 0
    return labels


def test_sampler_counts_cap_positives_and_fill_with_negatives():
    labels = _labels()
    pos, neg = subsample_labels(labels, 16, 0.25, 0)  # int(16 * 0.25) = 4 positives, 12 negatives
    assert len(pos) == 4 and len(neg) == 12
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 4 and len(set(neg.tolist())) == 12
    pos, neg = subsample_labels(labels, 256, 0.5, 0)  # too few of both: everything, once
    assert sorted(pos.tolist()) == list(range(0, 100, 10))
    assert sorted(neg.tolist()) == list(range(1, 100, 2))


def test_sampler_positive_fraction_truncates_like_int():
    labels = _labels()
    pos, neg = subsample_labels(labels, 7, 0.5, 0)  # int(3.5) = 3
    assert len(pos) == 3 and len(neg) == 4


def test_sampler_with_background_label_other_than_zero():
    # ROI-head style: classes 0..K-1 foreground, K background, -1 ignored
    labels = torch.tensor([3, 5, 5, -1, 0, 5, 2])
    pos, neg = subsample_labels(labels, 10, 0.25, 5)  # int(2.5) = 2 fg of {0, 4, 6}
    assert len(pos) == 2 and set(pos.tolist()) <= {0, 4, 6}
    assert sorted(neg.tolist()) == [1, 2, 5]


def test_sampler_replays_detectron2_randperm_draws_under_a_seed():
    labels = _labels()
    torch.manual_seed(123)
    pos, neg = subsample_labels(labels, 16, 0.25, 0)
    # the same draws, written out: positives first, then negatives, over ascending nonzero indices
    torch.manual_seed(123)
    positives = torch.arange(0, 100, 10)
    negatives = torch.arange(1, 100, 2)
    expected_pos = positives[torch.randperm(10)[:4]]
    expected_neg = negatives[torch.randperm(50)[:12]]
    assert pos.tolist() == expected_pos.tolist() and neg.tolist() == expected_neg.tolist()
    # and a second call continues the RNG stream (different draw), as consecutive images do
    pos2, _ = subsample_labels(labels, 16, 0.25, 0)
    torch.manual_seed(123)
    assert subsample_labels(labels, 16, 0.25, 0)[0].tolist() == pos.tolist()
    assert pos2.tolist() != pos.tolist()


def test_sampler_with_a_generator_leaves_the_global_rng_alone():
    """``SOLVER.RANK_INVARIANT``'s per-image generators: the same draws for the same seed, made
    as the global-RNG calls would be from that generator, and the global stream untouched."""
    labels = _labels()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    g = torch.Generator().manual_seed(99)
    pos, neg = subsample_labels(labels, 16, 0.25, 0, generator=g)
    assert torch.equal(torch.get_rng_state(), before)
    g.manual_seed(99)
    expected_pos = torch.arange(0, 100, 10)[torch.randperm(10, generator=g)[:4]]
    expected_neg = torch.arange(1, 100, 2)[torch.randperm(50, generator=g)[:12]]
    assert pos.tolist() == expected_pos.tolist() and neg.tolist() == expected_neg.tolist()
    again = subsample_labels(labels, 16, 0.25, 0, generator=torch.Generator().manual_seed(99))
    assert again[0].tolist() == pos.tolist() and again[1].tolist() == neg.tolist()
