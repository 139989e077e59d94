"""Detectron2's ``subsample_labels``: a random, fraction-capped subset of positives and negatives.

The two ``torch.randperm`` calls (positives first, then negatives, over ``nonzero()`` indices in
ascending order) are made exactly as Detectron2@ffff8ac makes them, so that after
``torch.manual_seed(s)`` the RPN and ROI heads draw the same anchors and proposals as the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def subsample_labels(
    labels: torch.Tensor,
    num_samples: int,
    positive_fraction: float,
    bg_label: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(pos_idx, neg_idx)`` of at most ``num_samples`` labels.

    ``labels``: ``[N]`` with -1 = ignore, ``bg_label`` = negative, anything else = positive.
    Positives: ``min(#positive, int(num_samples * positive_fraction))``; negatives fill the rest,
    ``min(#negative, num_samples - num_pos)``. Indices are in draw order, not sorted.

    ``generator``: draw both permutations from it (a generator on ``labels``' device) instead of
    the global RNG; ``SOLVER.RANK_INVARIANT`` gives every image its own. ``None`` makes exactly
    Detectron2's calls.
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
    negative = torch.nonzero(labels == bg_label).squeeze(1)

    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)

    if generator is None:
        perm1 = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
        perm2 = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    else:
        perm1 = torch.randperm(positive.numel(), generator=generator, device=positive.device)
        perm2 = torch.randperm(negative.numel(), generator=generator, device=negative.device)
        perm1, perm2 = perm1[:num_pos], perm2[:num_neg]
    return positive[perm1], negative[perm2]
