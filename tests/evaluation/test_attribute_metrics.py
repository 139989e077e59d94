"""Attribute metrics on ground-truth boxes, by hand on a tiny case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gridfeats.evaluation import attribute_metrics, average_precision


def test_average_precision_by_hand():
    # ranks of the positives: 1 and 3 -> (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == (
        pytest.approx((1 + 2 / 3) / 2)
    )
    assert average_precision(np.array([0.1, 0.9]), np.array([1, 0])) == pytest.approx(0.5)
    assert math.isnan(average_precision(np.array([0.5]), np.array([0])))


def test_attribute_metrics_by_hand():
    # 3 boxes, 6 attributes; box 2 has no labels (not counted in top-k, a negative for AP)
    probs = np.array(
        [
            [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # labels {0, 3}: top-1 = 0 hit
            [0.05, 0.10, 0.40, 0.30, 0.10, 0.05],  # labels {5}: top-1 = 2 miss; top-5 misses 5
            [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # no labels
        ]
    )
    labels = [[0, 3, -1], [5], []]
    m = attribute_metrics(probs, labels)
    assert m["boxes"] == 2 and m["classes"] == 3
    assert m["top1"] == pytest.approx(0.5)
    # box 1's five most probable: 2, 3, 1, 4, 0 (ties kept in index order) -> 5 is not among them
    assert m["top5"] == pytest.approx(0.5)
    # attribute 0: scores .50 .05 .10 -> positive box 0 at rank 1 -> AP 1
    # attribute 3: scores .10 .30 .10 -> box 0 ranks 2nd (tie with box 2 kept in order) -> 1/2
    # attribute 5: scores .05 .05 .05 -> box 1 ranks 2nd (stable ties) -> 1/2
    assert m["mAP"] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_no_labels_give_nan_and_bad_ids_are_refused():
    m = attribute_metrics(np.full((2, 3), 1 / 3), [[], []])
    assert math.isnan(m["mAP"]) and math.isnan(m["top1"]) and m["boxes"] == 0
    with pytest.raises(ValueError, match="beyond"):
        attribute_metrics(np.full((1, 3), 1 / 3), [[3]])
