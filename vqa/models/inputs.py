"""Input pieces shared by every head: image rows with their positions, masks, word embeddings.

Why one module: Pythia, MCAN and Up-Down all read the same thing (a variable number of feature rows
per image, each with a location) and the same question tokens. Keeping the row/position encoding
and the masked softmax here gives the three models one definition of "where a row is" and one way
of ignoring padded rows, so grid and region features behave the same in all of them.

Position design (the papers leave it implicit): every row gets a normalised box
``(x1, y1, x2, y2)`` in ``[0, 1]`` of the original image. A region row uses its detected box divided
by the image size; a grid row at ``(y, x)`` of an ``h x w`` map uses the cell it covers,
``(x/w, y/h, (x+1)/w, (y+1)/h)``. The box plus its area (5 numbers) goes through a linear layer and
is added to the projected feature, as in LXMERT/ViLBERT's box embedding.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

POSITION_DIM = 5  # x1, y1, x2, y2, area


def grid_cell_boxes(grid_h: int, grid_w: int) -> torch.Tensor:
    """Normalised boxes ``[grid_h * grid_w, 4]`` of the cells of a feature map, row-major.

    Row ``y * w + x`` matches the feature store's grid layout, so the result lines up with the
    stored rows without any reordering.
    """
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"grid size must be positive, got {grid_h}x{grid_w}")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    ys = ys.reshape(-1).float()
    xs = xs.reshape(-1).float()
    return torch.stack([xs / grid_w, ys / grid_h, (xs + 1) / grid_w, (ys + 1) / grid_h], dim=1)


def box_position_features(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` normalised xyxy boxes -> ``[..., 5]`` (the box and its area).

    The area lets a model tell a whole-image region from a small one in a single linear layer.
    """
    width = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    height = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return torch.cat([boxes, (width * height).unsqueeze(-1)], dim=-1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` where ``mask`` is False gets exactly zero weight.

    A fully masked slice (should not happen, but an empty image could) returns zeros instead of
    NaN, so one bad sample cannot poison a batch's gradients.
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(weights, nan=0.0)


def masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``rows [B, N, D]`` over the valid rows of ``mask [B, N]``."""
    weights = mask.unsqueeze(-1).to(rows.dtype)
    return (rows * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ImageRowEncoder(nn.Module):
    """Projects feature rows to the model width and adds the encoded row position.

    ``activation`` is on for Pythia/Up-Down (their image embedding is a ReLU layer, like the
    fine-tuned fc7 of bottom-up features) and off for MCAN (a plain linear map in the paper).
    """

    def __init__(
        self,
        feature_dim: int,
        out_dim: int,
        use_position: bool = True,
        activation: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, out_dim)
        self.position_proj = nn.Linear(POSITION_DIM, out_dim) if use_position else None
        self.activation = nn.ReLU() if activation else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, boxes: Optional[torch.Tensor]) -> torch.Tensor:
        rows = self.feature_proj(feats)
        if self.position_proj is not None:
            if boxes is None:
                raise ValueError("this model was built with use_position=True but got no boxes")
            rows = rows + self.position_proj(box_position_features(boxes.to(rows.dtype)))
        return self.dropout(self.activation(rows))


class WordEmbedding(nn.Embedding):
    """Token embedding with id 0 as padding, optionally initialised from pretrained vectors.

    ``vectors`` is a ``[vocab_size, dim]`` array (e.g. from the data module's GloVe loader); rows
    for words missing from the vector file are expected to be filled by that loader.
    """

    def __init__(
        self, vocab_size: int, dim: int, vectors: Optional[np.ndarray] = None, freeze: bool = False
    ) -> None:
        super().__init__(vocab_size, dim, padding_idx=0)
        if vectors is not None:
            vectors = np.asarray(vectors, dtype=np.float32)
            if vectors.shape != (vocab_size, dim):
                raise ValueError(
                    f"word vectors have shape {vectors.shape}, expected ({vocab_size}, {dim})"
                )
            with torch.no_grad():
                self.weight.copy_(torch.from_numpy(vectors))
                self.weight[0].zero_()
        self.weight.requires_grad_(not freeze)


def run_lstm(lstm: nn.LSTM, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Runs a batch-first LSTM over right-padded sequences so padding never leaks into states.

    Outputs at padded steps are zero. Zero-length sequences are run as length 1 (they are
    masked out downstream anyway) because packing rejects empty sequences.
    """
    total = embedded.shape[1]
    packed = nn.utils.rnn.pack_padded_sequence(
        embedded, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
    )
    out, _ = lstm(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=total)
    return out
