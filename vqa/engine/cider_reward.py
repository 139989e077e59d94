"""CIDEr-D as a training reward for self-critical sequence training (SCST).

Why not the evaluation toolkit: ``vqa.metrics.evaluate_captions`` runs the Java PTB tokenizer and
recomputes document frequencies from the references it is given, which is right for a test set
but far too slow for a reward computed on every batch, and wrong on a batch (document frequencies
of 64 images). Here captions are already token ids, and document frequencies come once from the
whole training corpus, as in Rennie et al. and ruotianluo/self-critical.pytorch.

The formula is the toolkit's CIDEr-D: for n = 1..4, TF-IDF vectors of n-grams
(``tf * (log N - log max(1, df))``), the candidate's weights clipped at the reference's
(``min(c, r) * r``), cosine-normalised, times the Gaussian length penalty
``exp(-(len_c - len_r)^2 / (2 sigma^2))`` with sigma 6; averaged over n and over the references,
times 10.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Dict, Hashable, List, Sequence, Tuple

Tokens = Sequence[int]
NGramVector = Tuple[List[Dict[Tuple[int, ...], float]], List[float], int]

MAX_N = 4
SIGMA = 6.0


def _ngram_counts(tokens: Tokens) -> List[Counter]:
    return [
        Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        for n in range(1, MAX_N + 1)
    ]


class CiderD:
    """CIDEr-D of candidate token lists against fixed per-image references.

    ``references`` maps an image key to its reference captions (token ids, without BOS/EOS/pad).
    """

    def __init__(self, references: Dict[Hashable, List[Tokens]]) -> None:
        if not references:
            raise ValueError("CIDEr-D needs at least one image with reference captions")
        document_frequency: Counter = Counter()
        self._ref_counts: Dict[Hashable, List[List[Counter]]] = {}
        for key, captions in references.items():
            counts = [_ngram_counts(list(c)) for c in captions]
            self._ref_counts[key] = counts
            document_frequency.update({g for caption in counts for per_n in caption for g in per_n})
        self._log_docs = math.log(float(len(references)))
        self._log_df = {g: math.log(max(1.0, df)) for g, df in document_frequency.items()}
        self._ref_vectors = {
            key: [self._vector(c) for c in counts] for key, counts in self._ref_counts.items()
        }

    def _vector(self, counts: List[Counter]) -> NGramVector:
        vectors, norms = [], []
        for per_n in counts:
            vec = {g: tf * (self._log_docs - self._log_df.get(g, 0.0)) for g, tf in per_n.items()}
            vectors.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vectors, norms, sum(counts[0].values())

    @staticmethod
    def _similarity(cand: NGramVector, ref: NGramVector) -> List[float]:
        (c_vecs, c_norms, c_len), (r_vecs, r_norms, r_len) = cand, ref
        penalty = math.exp(-((c_len - r_len) ** 2) / (2 * SIGMA**2))
        values = []
        for c_vec, r_vec, c_norm, r_norm in zip(c_vecs, r_vecs, c_norms, r_norms):
            dot = sum(min(w, r_vec[g]) * r_vec[g] for g, w in c_vec.items() if g in r_vec)
            values.append(dot / (c_norm * r_norm) * penalty if c_norm and r_norm else 0.0)
        return values

    def score(self, key: Hashable, candidate: Tokens) -> float:
        """CIDEr-D of one candidate for image ``key`` (whose references were given at init)."""
        if key not in self._ref_vectors:
            raise KeyError(f"no reference captions for image {key!r}")
        cand = self._vector(_ngram_counts(list(candidate)))
        refs = self._ref_vectors[key]
        total = sum(sum(self._similarity(cand, ref)) / MAX_N for ref in refs)
        return 10.0 * total / len(refs)
