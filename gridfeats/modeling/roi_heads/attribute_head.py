"""grid-feats-vqa's attribute predictor: box feature + class embedding -> 400 attribute logits."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class AttributePredictor(nn.Module):
    """``attr_score(relu(fc(cat[feature, obj_embed(class)])))``; keys ``obj_embed``, ``fc.0``,
    ``attr_score``.

    In training the class is the ground truth (teacher forcing); at inference the predicted class.
    The embedding has ``num_classes + 1`` rows (background last), as in the released checkpoints.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        num_attributes: int = 400,
        embed_dim: int = 256,
        fc_dim: int = 512,
    ):
        super().__init__()
        self.obj_embed = nn.Embedding(num_classes + 1, embed_dim)
        self.fc = nn.Sequential(nn.Linear(input_size + embed_dim, fc_dim), nn.ReLU(inplace=True))
        self.attr_score = nn.Linear(fc_dim, num_attributes)
        nn.init.normal_(self.attr_score.weight, std=0.01)
        nn.init.constant_(self.attr_score.bias, 0)

    def forward(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.attr_score(self.fc(torch.cat([features, self.obj_embed(classes)], dim=1)))


def attribute_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_weight: float = 0.2,
    normalizer: Optional[float] = None,
) -> torch.Tensor:
    """grid-feats-vqa's ``AttributePredictor.loss`` (detectron2-compat.md 7.3).

    ``logits [n, A]`` of the n foreground proposals, ``labels [n, W]`` attribute ids padded with
    -1. Every valid label is one A-way cross-entropy of its row's logits, weighted by
    1 / (number of valid labels of the row); the weighted sum over all rows is divided by the number
    of rows with at least one label and multiplied by ``loss_weight``. Without any labelled row the
    loss is a differentiable 0. The operation order is grid-feats' (weights applied per label).

    ``normalizer``: the divisor instead of this batch's labelled-row count
    (``SOLVER.RANK_INVARIANT`` passes all ranks' count over the world size; a rank without
    labelled rows then still returns its differentiable 0).
    """
    n, width = labels.shape
    if n == 0:  # no foreground proposal in the batch
        return logits.sum() * 0.0
    num_attributes = logits.shape[1]
    expanded = logits.unsqueeze(1).expand(n, width, num_attributes).reshape(-1, num_attributes)
    counts = (labels >= 0).sum(dim=1)
    weights = counts.repeat(width, 1).transpose(0, 1).flatten().float().reciprocal()
    weights[weights > 1] = 0.0  # rows without labels: 1 / 0 = inf -> weight 0
    n_valid = int((counts > 0).sum())
    ce = F.cross_entropy(expanded, labels.reshape(-1), reduction="none", ignore_index=-1)
    per_row = (ce * weights).view(n, -1).sum(dim=1)
    if normalizer is not None:
        if n_valid == 0 or normalizer <= 0:
            return per_row.sum() * 0.0
        return per_row.sum() * loss_weight / normalizer
    if n_valid == 0:
        return per_row.sum() * 0.0
    return per_row.sum() * loss_weight / n_valid
