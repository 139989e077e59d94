"""Attribute metrics on ground-truth boxes: mean AP over attributes, top-1 and top-5 accuracy.

The attribute head is scored where its answer is defined without a detector in the loop: on the
ground-truth boxes, with the ground-truth class (grid-feats-vqa trains it that way, teacher
forcing). For each box the model gives a probability per attribute; the box's labels are the set
of its ``attribute_ids``.

* ``mAP``: for every attribute that some box has, the average precision of ranking all boxes
  by that attribute's probability (positives: the boxes that have it; the non-interpolated AP,
  the mean of the precision at each positive's rank, ties ranked by box order); the mean over those
  attributes. Attributes nobody has are left out (their AP is undefined).
* ``top1`` / ``top5``: over the boxes with at least one label, the share whose most
  probable attribute (any of the 5 most probable) is one of its labels.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP of ``scores`` (higher first) for the boolean ``positives``.

    The sort is stable, so equal scores keep the input order (a fixed, documented tie rule).
    """
    positives = np.asarray(positives, dtype=bool)
    count = int(positives.sum())
    if count == 0:
        return math.nan
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = positives[order]
    ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the positives
    precision_at_hits = np.arange(1, count + 1) / ranks
    return float(precision_at_hits.mean())


def attribute_metrics(
    probs: np.ndarray, labels: Sequence[Sequence[int]], top_k: Sequence[int] = (1, 5)
) -> Dict[str, float]:
    """``probs [N, A]`` (one row per ground-truth box) against each box's attribute ids.

    Returns ``mAP``, ``top1``, ``top5`` (NaN when nothing is labelled),
    ``boxes`` (boxes with labels) and ``classes`` (attributes that occur).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(labels):
        raise ValueError(f"probs must be [N, A] with N = {len(labels)} boxes, got {probs.shape}")
    n, num_attributes = probs.shape
    targets = np.zeros((n, num_attributes), dtype=bool)
    for i, ids in enumerate(labels):
        ids = [int(a) for a in ids if int(a) >= 0]
        if any(a >= num_attributes for a in ids):
            raise ValueError(f"box {i} has attribute ids beyond the {num_attributes} predicted")
        targets[i, ids] = True
    labelled = targets.any(axis=1)
    occurring = np.flatnonzero(targets.any(axis=0))
    aps = [average_precision(probs[:, a], targets[:, a]) for a in occurring]
    metrics: Dict[str, float] = {
        "mAP": float(np.mean(aps)) if aps else math.nan,
        "boxes": float(labelled.sum()),
        "classes": float(len(occurring)),
    }
    order = np.argsort(-probs, axis=1, kind="stable")
    for k in top_k:
        top = order[:, : min(k, num_attributes)]
        hit = np.take_along_axis(targets, top, axis=1).any(axis=1)
        metrics[f"top{k}"] = float(hit[labelled].mean()) if labelled.any() else math.nan
    return metrics
