"""Pythia v0.1 VQA model (Jiang et al., 2018), on grid or region feature rows.

Pythia is bottom-up top-down VQA with a few changes that the paper found to matter:
  * question encoder: word embeddings -> LSTM (or, optionally, a pretrained transformer from a
    local directory) -> self-attention with several glimpses (two
    1-d convolutions give one softmax over words per glimpse; the glimpses are concatenated);
  * top-down image attention: each row is scored from the element-wise product of
    weight-normed ReLU projections of the row and of the question (hidden 5000 in mmf);
  * fusion: element-wise product of weight-normed ReLU projections of the attended image
    vector and of the question vector;
  * classifier: weight-normed linear layers with ReLU (instead of gated tanh), trained with
    binary cross-entropy over soft answer scores.

Sizes default to the paper's; tests build tiny instances through the same constructor.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from vqa.models.inputs import ImageRowEncoder, WordEmbedding, masked_softmax, run_lstm
from vqa.models.text_encoder import PretrainedTextEncoder


def wn_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A linear layer with weight normalisation over the whole matrix (BUTD's ``dim=None``)."""
    return weight_norm(nn.Linear(in_dim, out_dim), dim=None)


class ReLUWeightNormFC(nn.Sequential):
    """``ReLU(WN(Linear(x)))``: the projection used throughout Pythia/BUTD."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(wn_linear(in_dim, out_dim), nn.ReLU())


class QuestionSelfAttention(nn.Module):
    """Word features (LSTM, or a pretrained transformer), pooled by ``glimpses`` attention maps.

    Several glimpses let the question vector hold, e.g., both the object and the asked property.
    Output width is ``glimpses * hidden_dim`` (``hidden_dim`` = the transformer's width when one
    is given).
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        hidden_dim: int,
        attention_dim: int,
        glimpses: int,
        word_vectors: Optional[np.ndarray] = None,
        freeze_words: bool = False,
        dropout: float = 0.0,
        text_encoder: Optional[PretrainedTextEncoder] = None,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        if text_encoder is None:
            self.embedding = WordEmbedding(vocab_size, word_dim, word_vectors, freeze_words)
            self.lstm = nn.LSTM(word_dim, hidden_dim, batch_first=True)
        else:
            hidden_dim = text_encoder.out_dim
        self.dropout = nn.Dropout(dropout)
        self.attention = nn.Sequential(
            nn.Conv1d(hidden_dim, attention_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv1d(attention_dim, glimpses, kernel_size=1),
        )
        self.out_dim = glimpses * hidden_dim

    def forward(self, question: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            words = self.text_encoder(question, word_mask)
        else:
            words = run_lstm(self.lstm, self.embedding(question), word_mask.sum(1))
        words = self.dropout(words)  # [B, T, H]
        scores = self.attention(words.transpose(1, 2))  # [B, G, T]
        weights = masked_softmax(scores, word_mask.unsqueeze(1), dim=2)
        pooled = torch.bmm(weights, words)  # [B, G, H]
        return pooled.flatten(1)


class TopDownAttention(nn.Module):
    """Question-guided soft attention over image rows, ignoring padded rows."""

    def __init__(self, image_dim: int, question_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.image_proj = ReLUWeightNormFC(image_dim, hidden_dim)
        self.question_proj = ReLUWeightNormFC(question_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_dim, 1)

    def forward(
        self, rows: torch.Tensor, row_mask: torch.Tensor, question: torch.Tensor
    ) -> torch.Tensor:
        joint = self.image_proj(rows) * self.question_proj(question).unsqueeze(1)
        scores = self.score(self.dropout(joint)).squeeze(-1)  # [B, N]
        weights = masked_softmax(scores, row_mask, dim=1)
        return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)


class Pythia(nn.Module):
    """Pythia v0.1: returns answer logits ``[B, num_answers]`` (use BCE-with-logits on them)."""

    def __init__(
        self,
        vocab_size: int,
        num_answers: int,
        feature_dim: int,
        word_dim: int = 300,
        question_hidden: int = 1024,
        question_attention: int = 512,
        glimpses: int = 2,
        image_dim: int = 2048,
        fusion_dim: int = 5000,
        classifier_hidden: int = 5000,
        dropout: float = 0.5,
        use_position: bool = True,
        word_vectors: Optional[np.ndarray] = None,
        freeze_words: bool = False,
        text_encoder: Optional[str] = None,
        freeze_text_encoder: bool = False,
    ) -> None:
        super().__init__()
        encoder = PretrainedTextEncoder(text_encoder, freeze_text_encoder) if text_encoder else None
        self.question_encoder = QuestionSelfAttention(
            vocab_size,
            word_dim,
            question_hidden,
            question_attention,
            glimpses,
            word_vectors,
            freeze_words,
            text_encoder=encoder,
        )
        question_dim = self.question_encoder.out_dim
        self.image_encoder = ImageRowEncoder(feature_dim, image_dim, use_position, activation=True)
        self.attention = TopDownAttention(image_dim, question_dim, fusion_dim, dropout)
        self.fuse_image = ReLUWeightNormFC(image_dim, fusion_dim)
        self.fuse_question = ReLUWeightNormFC(question_dim, fusion_dim)
        self.fusion_dropout = nn.Dropout(dropout)
        self.classifier = nn.Sequential(
            wn_linear(fusion_dim, classifier_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            wn_linear(classifier_hidden, num_answers),
        )

    def forward(
        self,
        feats: torch.Tensor,
        feat_mask: torch.Tensor,
        boxes: Optional[torch.Tensor],
        question: torch.Tensor,
        question_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``feats [B,N,D]``, ``feat_mask [B,N]`` bool, ``boxes [B,N,4]``, ``question [B,T]``.

        ``question_mask`` defaults to ``question != 0`` (id 0 is padding).
        """
        if question_mask is None:
            question_mask = question != 0
        q = self.question_encoder(question, question_mask)
        rows = self.image_encoder(feats, boxes)
        attended = self.attention(rows, feat_mask, q)
        joint = self.fuse_image(attended) * self.fuse_question(q)
        return self.classifier(self.fusion_dropout(joint))
