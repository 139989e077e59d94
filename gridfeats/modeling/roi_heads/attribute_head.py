"""grid-feats-vqa's attribute predictor: box feature + class embedding -> 400 attribute logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttributePredictor(nn.Module):
    """``attr_score(relu(fc(cat[feature, obj_embed(class)])))``; keys ``obj_embed``, ``fc.0``, ``attr_score``.

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
    logits: torch.Tensor, labels: torch.Tensor, loss_weight: float = 0.2
) -> torch.Tensor:
    """grid-feats' loss: per instance the mean CE over its valid labels (``-1`` = padding),
    averaged over instances that have at least one label, times ``loss_weight``."""
    n, width = labels.shape
    valid = labels >= 0
    counts = valid.sum(dim=1)
    expanded = logits.unsqueeze(1).expand(n, width, logits.shape[1]).reshape(-1, logits.shape[1])
    ce = F.cross_entropy(expanded, labels.clamp(min=0).reshape(-1), reduction="none").view(n, width)
    per_instance = (ce * valid).sum(dim=1) / counts.clamp(min=1)
    n_valid = int((counts > 0).sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    return loss_weight * per_instance.sum() / n_valid
