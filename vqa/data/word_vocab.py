"""Word vocabulary for questions and captions: token <-> id, built from training text.

Id 0 is always padding (every model in ``vqa.models`` treats id 0 as "no word"), then the other
special tokens, then words by decreasing training count (ties alphabetical, so the same text
always gives the same ids). Questions use ``QUESTION_SPECIALS``; captions add begin/end markers
(``CAPTION_SPECIALS``) that the captioner needs as ``bos_id``/``eos_id``.

The vocabulary is saved as JSON next to a checkpoint: the ids a model was trained with must be the
ids it is evaluated with.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from vqa.data.json_files import DataFormatError, read_json
from vqa.data.text import tokenize

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
QUESTION_SPECIALS = (PAD, UNK)
CAPTION_SPECIALS = (PAD, BOS, EOS, UNK)


class WordVocab:
    """Maps words to ids (unknown words -> ``<unk>``) and back."""

    def __init__(self, words: Sequence[str], specials: Sequence[str] = QUESTION_SPECIALS) -> None:
        if not specials or specials[0] != PAD or UNK not in specials:
            raise ValueError(
                f"specials must start with {PAD!r} and contain {UNK!r}, got {specials}"
            )
        self.specials = tuple(specials)
        self.itos: List[str] = list(self.specials) + [w for w in words if w not in self.specials]
        self.stoi: Dict[str, int] = {word: i for i, word in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        min_count: int = 1,
        specials: Sequence[str] = QUESTION_SPECIALS,
        max_size: Optional[int] = None,
    ) -> "WordVocab":
        """Words of ``texts`` (tokenised with ``vqa.data.text.tokenize``) seen ``>= min_count``
        times; ``max_size`` caps the number of words (specials not counted)."""
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        counts = Counter(token for text in texts for token in tokenize(text))
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(ranked[:max_size] if max_size is not None else ranked, specials)

    @classmethod
    def from_questions(
        cls, questions: Union[str, "os.PathLike[str]", dict, list], min_count: int = 1
    ) -> "WordVocab":
        """Question vocabulary from one VQA questions file (path or loaded), or a list of them."""
        sources = questions if isinstance(questions, list) else [questions]
        texts: List[str] = []
        for source in sources:
            loaded = read_json(source, "VQA questions")
            if not isinstance(loaded, dict) or not isinstance(loaded.get("questions"), list):
                raise DataFormatError("VQA questions must be a JSON object with a 'questions' list")
            texts.extend(str(entry.get("question", "")) for entry in loaded["questions"])
        return cls.build(texts, min_count=min_count, specials=QUESTION_SPECIALS)

    @classmethod
    def from_captions(
        cls, captions: Union[str, "os.PathLike[str]", dict], min_count: int = 5
    ) -> "WordVocab":
        """Caption vocabulary from a COCO captions file; 5 is the usual COCO threshold."""
        loaded = read_json(captions, "COCO captions")
        if not isinstance(loaded, dict) or not isinstance(loaded.get("annotations"), list):
            raise DataFormatError("COCO captions must be a JSON object with an 'annotations' list")
        texts = [str(entry.get("caption", "")) for entry in loaded["annotations"]]
        return cls.build(texts, min_count=min_count, specials=CAPTION_SPECIALS)

    # ----------------------------------------------------------------- lookups
    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def _special_id(self, token: str) -> int:
        if token not in self.stoi:
            raise KeyError(f"this vocabulary has no {token} token (specials: {self.specials})")
        return self.stoi[token]

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return self._special_id(UNK)

    @property
    def bos_id(self) -> int:
        return self._special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self._special_id(EOS)

    def encode(
        self, text: str, max_length: Optional[int] = None, add_bos_eos: bool = False
    ) -> List[int]:
        """Token ids of ``text``, truncated to ``max_length`` words (markers not counted)."""
        unk = self.unk_id
        ids = [self.stoi.get(token, unk) for token in tokenize(text)]
        if max_length is not None:
            ids = ids[:max_length]
        if add_bos_eos:
            ids = [self.bos_id] + ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` up to the first ``<eos>``, skipping padding and ``<bos>``."""
        eos = self.stoi.get(EOS)
        skipped = {self.pad_id, self.stoi.get(BOS)}
        words = []
        for i in ids:
            i = int(i)
            if i == eos:
                break
            if i in skipped:
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    # ----------------------------------------------------------------- files
    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        data = {"specials": list(self.specials), "words": self.itos[len(self.specials) :]}
        Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "WordVocab":
        data = read_json(path, "word vocabulary")
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("words"), list)
            or not isinstance(data.get("specials"), list)
        ):
            raise DataFormatError(
                f"{path} is not a word vocabulary file "
                "(expected a JSON object with 'specials' and 'words' lists)"
            )
        return cls(data["words"], data["specials"])
