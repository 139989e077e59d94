"""Progress and collapse monitors: kNN accuracy on frozen features, std of l2-normalised outputs.

* ``output_std``: SimSiam's collapse monitor (paper Fig. 2): the per-channel std over a batch of the
  l2-normalised output, averaged over channels; ~1/sqrt(d) when outputs spread like an isotropic
  Gaussian, 0 when every image maps to one point. We report it with ``output_dim`` = d, and the
  loop warns when ``output_std * sqrt(d)`` falls under a threshold.
* ``knn_top1``: weighted k-NN (InstDisc / DINO ``eval_knn.py``): l2-normalised features, cosine
  similarity, the k = 20 nearest train features vote for their class with weight exp(sim / 0.07).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def output_std(outputs: torch.Tensor) -> float:
    """Mean over channels of the batch std of the l2-normalised outputs [N, d]."""
    z = F.normalize(outputs.float(), dim=1)
    return float(z.std(dim=0).mean())


def collapse_score(std: float, dim: int) -> float:
    """``output_std * sqrt(d)``: ~1 healthy, ~0 collapsed."""
    return std * math.sqrt(dim)


@torch.no_grad()
def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of the weighted cosine k-NN classifier."""
    train = F.normalize(train_feats.float(), dim=1)
    val = F.normalize(val_feats.float(), dim=1)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, len(train))
    sim, idx = (val @ train.T).topk(k, dim=1)
    weights = (sim / temperature).exp()
    votes = torch.zeros(len(val), num_classes)
    votes.scatter_add_(1, train_labels[idx], weights)
    return float((votes.argmax(1) == val_labels).float().mean())


@torch.no_grad()
def embed(
    fn: Callable[[torch.Tensor], torch.Tensor], batches: Sequence[torch.Tensor]
) -> torch.Tensor:
    return torch.cat([fn(b) for b in batches]) if batches else torch.zeros(0)
