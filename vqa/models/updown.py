"""Up-Down image captioner (Anderson et al., CVPR 2018) on grid or region feature rows.

Two LSTMs per word step:
  * the attention LSTM reads ``[h_language(t-1), mean image row, embedding(word(t-1))]``;
  * its state scores every image row (``w^T tanh(W_v v_i + W_h h_attention)``, padded rows masked)
    and the soft-attended row ``v_hat`` feeds
  * the language LSTM with ``[v_hat, h_attention]``; a linear layer over its state gives the next
    word's logits.
Training is teacher-forced cross-entropy (``forward``); decoding is greedy, sampled (for
self-critical training, with per-token log-probabilities kept for the policy gradient) or beam
search. Token id 0 is padding; ``bos_id``/``eos_id`` come from the caption vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import nn

from vqa.models.inputs import ImageRowEncoder, masked_mean, masked_softmax

State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EncodedImage(NamedTuple):
    """Per-image tensors computed once per caption and reused at every word step."""

    rows: torch.Tensor  # [B, N, H]
    mask: torch.Tensor  # [B, N]
    mean: torch.Tensor  # [B, H]
    keys: torch.Tensor  # [B, N, A] attention keys W_v v_i

    def repeat(self, times: int) -> "EncodedImage":
        """Each image repeated ``times`` times consecutively (for beams and multiple samples)."""
        return EncodedImage(*(t.repeat_interleave(times, dim=0) for t in self))


class UpDownCaptioner(nn.Module):
    """Up-Down captioner; sizes default to the paper's (hidden 1000, attention 512, embed 1000)."""

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        bos_id: int,
        eos_id: int,
        hidden: int = 1000,
        attention_dim: int = 512,
        word_dim: int = 1000,
        dropout: float = 0.5,
        use_position: bool = True,
    ) -> None:
        super().__init__()
        if not (0 < bos_id < vocab_size and 0 < eos_id < vocab_size):
            raise ValueError("bos_id and eos_id must be non-padding ids inside the vocabulary")
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.hidden = hidden
        self.image_encoder = ImageRowEncoder(
            feature_dim, hidden, use_position, activation=True, dropout=dropout
        )
        self.embedding = nn.Sequential(
            nn.Embedding(vocab_size, word_dim, padding_idx=0), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attention_lstm = nn.LSTMCell(hidden + hidden + word_dim, hidden)
        self.language_lstm = nn.LSTMCell(hidden + hidden, hidden)
        self.key_proj = nn.Linear(hidden, attention_dim)
        self.query_proj = nn.Linear(hidden, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)
        self.output_dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden, vocab_size)

    # ----------------------------------------------------------------- building blocks
    def encode(
        self, feats: torch.Tensor, feat_mask: torch.Tensor, boxes: Optional[torch.Tensor]
    ) -> EncodedImage:
        rows = self.image_encoder(feats, boxes)
        return EncodedImage(rows, feat_mask, masked_mean(rows, feat_mask), self.key_proj(rows))

    def initial_state(self, batch: int, like: torch.Tensor) -> State:
        zeros = like.new_zeros(batch, self.hidden)
        return zeros, zeros, zeros, zeros

    def step(
        self, words: torch.Tensor, state: State, image: EncodedImage
    ) -> Tuple[torch.Tensor, State]:
        """One word step: ``words [B]`` (previous tokens) -> next-word logits ``[B, V]``."""
        h_att, c_att, h_lang, c_lang = state
        att_input = torch.cat([h_lang, image.mean, self.embedding(words)], dim=1)
        h_att, c_att = self.attention_lstm(att_input, (h_att, c_att))
        scores = self.attention_score(
            torch.tanh(image.keys + self.query_proj(h_att).unsqueeze(1))
        ).squeeze(-1)
        weights = masked_softmax(scores, image.mask, dim=1)
        attended = torch.bmm(weights.unsqueeze(1), image.rows).squeeze(1)
        h_lang, c_lang = self.language_lstm(torch.cat([attended, h_att], dim=1), (h_lang, c_lang))
        logits = self.output(self.output_dropout(h_lang))
        return logits, (h_att, c_att, h_lang, c_lang)

    # ----------------------------------------------------------------- training
    def forward(
        self,
        feats: torch.Tensor,
        feat_mask: torch.Tensor,
        boxes: Optional[torch.Tensor],
        captions_in: Optional[torch.Tensor] = None,
        mode: str = "teacher_forcing",
        **sample_options: Any,
    ) -> Any:
        """Teacher forcing: ``captions_in [B, L]`` (starting with BOS) -> logits ``[B, L, V]``.

        ``mode="sample"`` runs ``sample(**sample_options)`` instead: SCST must go through
        ``forward`` so that DistributedDataParallel sees the call and syncs its gradients.
        """
        if mode == "sample":
            return self.sample(feats, feat_mask, boxes, **sample_options)
        if mode != "teacher_forcing" or captions_in is None:
            raise ValueError("forward needs captions_in (teacher forcing) or mode='sample'")
        image = self.encode(feats, feat_mask, boxes)
        state = self.initial_state(feats.shape[0], image.mean)
        logits = []
        for t in range(captions_in.shape[1]):
            step_logits, state = self.step(captions_in[:, t], state, image)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    # ----------------------------------------------------------------- decoding
    def _forbid_special(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Padding and BOS are never generated; EOS is how a caption ends."""
        logprobs = logprobs.clone()
        logprobs[:, 0] = float("-inf")
        logprobs[:, self.bos_id] = float("-inf")
        return logprobs

    def sample(
        self,
        feats: torch.Tensor,
        feat_mask: torch.Tensor,
        boxes: Optional[torch.Tensor],
        max_len: int,
        greedy: bool = True,
        samples_per_image: int = 1,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Greedy or multinomial decoding.

        Returns ``tokens [B*S, L]`` (0 after EOS, EOS kept) and the per-token log-probabilities
        ``[B*S, L]`` of the chosen tokens (0 after EOS), differentiable for SCST. Images come in
        groups of ``samples_per_image`` consecutive rows.
        """
        image = self.encode(feats, feat_mask, boxes)
        if samples_per_image > 1:
            image = image.repeat(samples_per_image)
        batch = image.rows.shape[0]
        state = self.initial_state(batch, image.mean)
        words = torch.full((batch,), self.bos_id, dtype=torch.long, device=feats.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=feats.device)
        tokens, token_logprobs = [], []
        for _ in range(max_len):
            logits, state = self.step(words, state, image)
            logprobs = self._forbid_special(torch.log_softmax(logits, dim=1))
            if greedy:
                words = logprobs.argmax(dim=1)
            else:
                words = torch.multinomial(logprobs.exp(), 1).squeeze(1)
            chosen = logprobs.gather(1, words.unsqueeze(1)).squeeze(1)
            words = words.masked_fill(finished, 0)
            tokens.append(words)
            token_logprobs.append(chosen.masked_fill(finished, 0.0))
            finished = finished | (words == self.eos_id)
            if bool(finished.all()):
                break
        return torch.stack(tokens, dim=1), torch.stack(token_logprobs, dim=1)

    @torch.no_grad()
    def beam_search(
        self,
        feats: torch.Tensor,
        feat_mask: torch.Tensor,
        boxes: Optional[torch.Tensor],
        beam_size: int = 3,
        max_len: int = 16,
    ) -> torch.Tensor:
        """Beam search by summed log-probability; returns the best ``tokens [B, L]`` per image.

        Finished beams carry their score unchanged (they may only extend with padding), so a
        short complete caption competes fairly with longer open ones.
        """
        batch = feats.shape[0]
        image = self.encode(feats, feat_mask, boxes).repeat(beam_size)
        state = self.initial_state(batch * beam_size, image.mean)
        device = feats.device
        words = torch.full((batch * beam_size,), self.bos_id, dtype=torch.long, device=device)
        # Only the first beam is live at the start, so the k beams do not duplicate each other.
        scores = torch.full((batch, beam_size), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=device)
        history = torch.zeros(batch * beam_size, 0, dtype=torch.long, device=device)
        for _ in range(max_len):
            logits, state = self.step(words, state, image)
            logprobs = self._forbid_special(torch.log_softmax(logits, dim=1))
            padding_only = torch.full_like(logprobs, float("-inf"))
            padding_only[:, 0] = 0.0
            logprobs = torch.where(finished.unsqueeze(1), padding_only, logprobs)
            candidates = scores.reshape(-1, 1) + logprobs  # [B*K, V]
            candidates = candidates.view(batch, beam_size * self.vocab_size)
            scores, flat_index = candidates.topk(beam_size, dim=1)
            source_beam = flat_index // self.vocab_size
            words = (flat_index % self.vocab_size).reshape(-1)
            source = (
                source_beam + torch.arange(batch, device=device).unsqueeze(1) * beam_size
            ).reshape(-1)
            state = tuple(s.index_select(0, source) for s in state)
            history = torch.cat([history.index_select(0, source), words.unsqueeze(1)], dim=1)
            finished = finished.index_select(0, source) | (words == self.eos_id)
            if bool(finished.all()):
                break
        best = scores.argmax(dim=1) + torch.arange(batch, device=device) * beam_size
        return history.index_select(0, best)
