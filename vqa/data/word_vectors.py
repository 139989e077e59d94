"""Pretrained word vectors from a user-given text file (GloVe or word2vec text format).

Nothing is downloaded: the user points at a file they have (e.g. ``glove.6B.300d.txt`` or
``glove.840B.300d.txt``). The file is streamed once and only the vocabulary's words are kept, so
a 5 GB file needs no more memory than the result. Format: one word per line followed by its
numbers, separated by spaces; an optional word2vec header line ``"<count> <dim>"`` is skipped.
Some GloVe 840B lines have spaces inside the "word", so the last ``dim`` fields are the vector
and everything before them is the word.

Words missing from the file get small random vectors (seeded, so runs repeat) and padding gets
zeros, which is what ``vqa.models.inputs.WordEmbedding`` expects.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from vqa.data.json_files import DataFormatError
from vqa.data.word_vocab import WordVocab

log = logging.getLogger(__name__)


def _vector_dim(first_line: str) -> tuple:
    """(dim, is_header) from the first line of the file."""
    fields = first_line.rstrip("\n").split(" ")
    if len(fields) == 2 and all(f.isdigit() for f in fields):
        return int(fields[1]), True
    return len(fields) - 1, False


def load_word_vectors(
    path: Union[str, "os.PathLike[str]"],
    vocab: WordVocab,
    dim: Optional[int] = None,
    seed: int = 0,
    missing_scale: float = 0.1,
) -> np.ndarray:
    """``[len(vocab), dim]`` float32 matrix: row ``i`` is the vector of ``vocab.itos[i]``.

    ``dim`` is read from the file when None (a given ``dim`` must match it). Raises
    ``DataFormatError`` for a missing file, a line with the wrong number of fields or a
    non-numeric value (with its line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"word vector file not found: {path}")
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
        if not first.strip():
            raise DataFormatError(f"word vector file {path} is empty")
        file_dim, has_header = _vector_dim(first)
        if file_dim < 1:
            raise DataFormatError(f"{path}: line 1 has no vector values")
        if dim is not None and dim != file_dim:
            raise DataFormatError(f"{path} holds {file_dim}-d vectors, but dim={dim} was asked")
        rng = np.random.default_rng(seed)
        vectors = (rng.standard_normal((len(vocab), file_dim)) * missing_scale).astype(np.float32)
        vectors[vocab.pad_id] = 0.0
        found = np.zeros(len(vocab), dtype=bool)
        lines = handle if has_header else _chain_first(first, handle)
        for number, line in enumerate(lines, start=2 if has_header else 1):
            fields = line.rstrip("\n").rstrip(" ").split(" ")
            if len(fields) == 1 and not fields[0]:
                continue  # blank line
            if len(fields) < file_dim + 1:
                raise DataFormatError(
                    f"{path}:{number}: expected a word and {file_dim} values, "
                    f"got {len(fields)} fields"
                )
            word = " ".join(fields[:-file_dim])
            index = vocab.stoi.get(word)
            if index is None or found[index] or index == vocab.pad_id:
                continue  # keep the first vector of a word, as GloVe readers usually do
            try:
                vectors[index] = np.asarray(fields[-file_dim:], dtype=np.float32)
            except ValueError:
                raise DataFormatError(
                    f"{path}:{number}: non-numeric vector value for {word!r}"
                ) from None
            found[index] = True
    covered = int(found.sum())
    log.info("word vectors: %d of %d vocabulary entries found in %s", covered, len(vocab), path)
    return vectors


def _chain_first(first: str, rest):
    yield first
    yield from rest
