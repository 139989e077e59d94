"""Visual Genome vocabulary files (``objects_vocab.txt``, ``attributes_vocab.txt``).

The bottom-up-attention format is one entry per line, an entry being one or more comma-separated
synonyms (``stop sign,stopsign``); the first synonym names the entry and line ``i`` (0-based) is
model class / attribute ``i`` in grid-feats-vqa. The released files end without a newline, so the
writer does the same and the reader accepts either. A blank line in the middle is rejected rather
than skipped, because skipping it would silently shift every later index by one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Union

from gridfeats.errors import GridfeatsError

PathLike = Union[str, os.PathLike]


class VocabError(GridfeatsError, ValueError):
    """A vocabulary file that cannot be used as an index table (``reason`` says why)."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.reason = reason


def parse_vocab(text: str, source: PathLike = "<text>") -> List[List[str]]:
    """Split vocabulary text into synonym lists, one per line, lower-cased and stripped."""
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()  # one trailing newline is allowed
    if not lines:
        raise VocabError(source, "the vocabulary is empty")
    entries: List[List[str]] = []
    for number, line in enumerate(lines, start=1):
        synonyms = [word.strip().lower() for word in line.split(",")]
        synonyms = [word for word in synonyms if word]
        if not synonyms:
            raise VocabError(source, f"line {number} is empty (it would shift every later index)")
        entries.append(synonyms)
    return entries


def read_vocab(path: PathLike) -> List[List[str]]:
    """Read a vocabulary file as one synonym list per index (see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise VocabError(path, f"not UTF-8 text ({exc.reason})") from None
    return parse_vocab(text, source=path)


def read_vocab_names(path: PathLike) -> List[str]:
    """Read a vocabulary file and return each entry's first synonym (its display name)."""
    return [synonyms[0] for synonyms in read_vocab(path)]


def format_vocab(entries: Sequence[Sequence[str]]) -> str:
    """Join synonym lists into vocabulary text (comma-separated synonyms, no final newline)."""
    lines = []
    for index, synonyms in enumerate(entries):
        if not synonyms or any(not word or "," in word or "\n" in word for word in synonyms):
            raise ValueError(
                f"vocabulary entry {index} is not a list of non-empty words: {synonyms!r}"
            )
        lines.append(",".join(synonyms))
    return "\n".join(lines)


def write_vocab(path: PathLike, entries: Sequence[Sequence[str]]) -> None:
    """Write synonym lists in the bottom-up-attention vocabulary format."""
    Path(path).write_text(format_vocab(entries), encoding="utf-8")
