"""Detectron2's ``Matcher``: assign each prediction (anchor, proposal) to its best ground truth.

Training labels depend on exact IoU comparisons (``>= low``, ``< high``) and on exact ties in the
low-quality rule, so the arithmetic mirrors Detectron2@ffff8ac step for step; a seeded reference
training step would otherwise label a different set of anchors.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


class Matcher:
    """Label predictions from an ``[M gt, N pred]`` match-quality (IoU) matrix.

    ``thresholds = [t1, ..., tk]`` split quality into k + 1 intervals ``[-inf, t1), [t1, t2), ...,
    [tk, inf)`` labelled by ``labels`` (each -1 = ignore, 0 = negative, 1 = positive). With
    ``allow_low_quality_matches``, every prediction whose quality *equals* some ground truth's best
    quality (ties included, even a best of 0) becomes positive, keeping its own argmax match: this
    is the Faster R-CNN rule that gives every ground truth at least one anchor.
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        labels: Sequence[int],
        allow_low_quality_matches: bool = False,
    ):
        thresholds = [float(t) for t in thresholds]
        if not thresholds or thresholds[0] <= 0:
            raise ValueError(f"Matcher thresholds must start above 0, got {thresholds}")
        bounds = [-float("inf"), *thresholds, float("inf")]
        if any(lo > hi for lo, hi in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"Matcher thresholds must be non-decreasing, got {thresholds}")
        labels = [int(x) for x in labels]
        if any(x not in (-1, 0, 1) for x in labels):
            raise ValueError(f"Matcher labels must be -1, 0 or 1, got {labels}")
        if len(labels) != len(bounds) - 1:
            raise ValueError(
                f"{len(thresholds)} thresholds need {len(thresholds) + 1} labels, got {labels}"
            )
        self.thresholds: List[float] = bounds
        self.labels: List[int] = labels
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(matches int64 [N], match_labels int8 [N])``; ``matches[i]`` is in ``[0, M)``.

        With no ground truth (``M == 0``) every prediction gets match 0 and the first label.
        """
        if match_quality_matrix.dim() != 2:
            raise ValueError("the match quality matrix must be 2-D [num_gt, num_predictions]")
        n = match_quality_matrix.size(1)
        if match_quality_matrix.numel() == 0:
            matches = match_quality_matrix.new_full((n,), 0, dtype=torch.int64)
            labels = match_quality_matrix.new_full((n,), self.labels[0], dtype=torch.int8)
            return matches, labels
        if not bool(torch.all(match_quality_matrix >= 0)):
            raise ValueError("match quality (IoU) must be non-negative")

        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = matches.new_full(matches.size(), 1, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            match_labels[(matched_vals >= low) & (matched_vals < high)] = label
        if self.allow_low_quality_matches:
            self._set_low_quality_matches_(match_labels, match_quality_matrix)
        return matches, match_labels

    @staticmethod
    def _set_low_quality_matches_(
        match_labels: torch.Tensor, match_quality_matrix: torch.Tensor
    ) -> None:
        best_per_gt, _ = match_quality_matrix.max(dim=1)
        pairs = torch.nonzero(match_quality_matrix == best_per_gt[:, None])
        match_labels[pairs[:, 1]] = 1
