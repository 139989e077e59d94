"""MCAN: Deep Modular Co-Attention Networks for VQA (Yu et al., CVPR 2019), encoder-decoder form.

Structure, following the paper and MILVLG/mcan-vqa's configs:
  * words: embeddings (300-d, GloVe in the paper) -> one-layer LSTM of width ``hidden`` (or,
    optionally, a pretrained transformer from a local directory and a linear map);
  * image rows: a linear map to ``hidden`` (plus this project's row-position encoding);
  * encoder: ``layers`` self-attention (SA) blocks over words;
  * decoder: ``layers`` SGA blocks over image rows, each = SA over rows, then guided attention
    (GA) where rows query the *final* encoder word features;
  * attentional flattening (AttFlat) of both outputs to ``flat_out`` each, summed, LayerNorm,
    linear to the answer vocabulary; BCE over soft scores.
Every attention block is multi-head attention with residual + LayerNorm, followed by a 4x FFN
with residual + LayerNorm (post-norm, as in the original).

``MCAN_SIZES`` holds the paper's small and large settings.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from vqa.models.inputs import ImageRowEncoder, WordEmbedding, masked_softmax, run_lstm
from vqa.models.text_encoder import PretrainedTextEncoder

MCAN_SIZES: Dict[str, Dict[str, int]] = {
    "small": {"hidden": 512, "heads": 8, "ffn": 2048, "flat_mlp": 512, "flat_out": 1024},
    "large": {"hidden": 1024, "heads": 16, "ffn": 4096, "flat_mlp": 512, "flat_out": 2048},
}


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``heads`` heads; ``key_mask [B, Nk]`` hides padding."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, key_value: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key_value))
        v = self._split(self.v_proj(key_value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        weights = self.dropout(masked_softmax(scores, key_mask[:, None, None, :], dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(query.shape)
        return self.out_proj(out)


class FeedForward(nn.Sequential):
    def __init__(self, hidden: int, ffn: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(hidden, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, hidden)
        )


class SelfAttentionBlock(nn.Module):
    """SA: self-attention then FFN, each with residual + LayerNorm."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(hidden, heads, dropout)
        self.ffn = FeedForward(hidden, ffn, dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.attention(x, x, mask)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class GuidedSelfAttentionBlock(nn.Module):
    """SGA: SA over image rows, then GA (rows attend to words), then FFN."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = MultiHeadAttention(hidden, heads, dropout)
        self.guided_attention = MultiHeadAttention(hidden, heads, dropout)
        self.ffn = FeedForward(hidden, ffn, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(3))
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(3))

    def forward(
        self,
        rows: torch.Tensor,
        row_mask: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
    ) -> torch.Tensor:
        rows = self.norms[0](rows + self.dropouts[0](self.self_attention(rows, rows, row_mask)))
        rows = self.norms[1](rows + self.dropouts[1](self.guided_attention(rows, words, word_mask)))
        return self.norms[2](rows + self.dropouts[2](self.ffn(rows)))


class AttentionalFlatten(nn.Module):
    """AttFlat: an MLP scores each element, glimpse-weighted sums are merged by a linear layer."""

    def __init__(
        self, hidden: int, mlp_dim: int, out_dim: int, glimpses: int, dropout: float
    ) -> None:
        super().__init__()
        self.score = nn.Sequential(
            nn.Linear(hidden, mlp_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_dim, glimpses)
        )
        self.merge = nn.Linear(hidden * glimpses, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = masked_softmax(self.score(x), mask.unsqueeze(-1), dim=1)  # [B, N, G]
        pooled = torch.einsum("bng,bnd->bgd", weights, x)
        return self.merge(pooled.flatten(1))


class MCAN(nn.Module):
    """MCAN encoder-decoder; returns answer logits ``[B, num_answers]``."""

    def __init__(
        self,
        vocab_size: int,
        num_answers: int,
        feature_dim: int,
        size: Optional[str] = "small",
        hidden: Optional[int] = None,
        heads: Optional[int] = None,
        ffn: Optional[int] = None,
        flat_mlp: Optional[int] = None,
        flat_out: Optional[int] = None,
        layers: int = 6,
        word_dim: int = 300,
        dropout: float = 0.1,
        flat_glimpses: int = 1,
        use_position: bool = True,
        word_vectors: Optional[np.ndarray] = None,
        freeze_words: bool = False,
        text_encoder: Optional[str] = None,
        freeze_text_encoder: bool = False,
    ) -> None:
        super().__init__()
        if size is not None and size not in MCAN_SIZES:
            raise ValueError(f"unknown MCAN size {size!r}; choose one of {sorted(MCAN_SIZES)}")
        dims = dict(MCAN_SIZES[size or "small"])
        for name, value in (
            ("hidden", hidden),
            ("heads", heads),
            ("ffn", ffn),
            ("flat_mlp", flat_mlp),
            ("flat_out", flat_out),
        ):
            if value is not None:
                dims[name] = value
        h = dims["hidden"]
        if text_encoder:
            self.text_encoder: Optional[PretrainedTextEncoder] = PretrainedTextEncoder(
                text_encoder, freeze_text_encoder
            )
            self.text_proj = nn.Linear(self.text_encoder.out_dim, h)
        else:
            self.text_encoder = None
            self.embedding = WordEmbedding(vocab_size, word_dim, word_vectors, freeze_words)
            self.lstm = nn.LSTM(word_dim, h, batch_first=True)
        self.image_encoder = ImageRowEncoder(feature_dim, h, use_position, activation=False)
        self.encoder = nn.ModuleList(
            SelfAttentionBlock(h, dims["heads"], dims["ffn"], dropout) for _ in range(layers)
        )
        self.decoder = nn.ModuleList(
            GuidedSelfAttentionBlock(h, dims["heads"], dims["ffn"], dropout) for _ in range(layers)
        )
        self.flatten_words = AttentionalFlatten(
            h, dims["flat_mlp"], dims["flat_out"], flat_glimpses, dropout
        )
        self.flatten_rows = AttentionalFlatten(
            h, dims["flat_mlp"], dims["flat_out"], flat_glimpses, dropout
        )
        self.fusion_norm = nn.LayerNorm(dims["flat_out"])
        self.classifier = nn.Linear(dims["flat_out"], num_answers)

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
        word_mask = question != 0 if question_mask is None else question_mask
        if self.text_encoder is not None:
            words = self.text_proj(self.text_encoder(question, word_mask))
        else:
            words = run_lstm(self.lstm, self.embedding(question), word_mask.sum(1))
        rows = self.image_encoder(feats, boxes)
        for block in self.encoder:
            words = block(words, word_mask)
        for block in self.decoder:
            rows = block(rows, feat_mask, words, word_mask)
        fused = self.flatten_words(words, word_mask) + self.flatten_rows(rows, feat_mask)
        return self.classifier(self.fusion_norm(fused))
