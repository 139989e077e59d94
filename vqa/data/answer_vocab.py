"""Answer vocabulary (the classifier's outputs) and soft target scores for VQA training.

Vocabulary: like the 3129-answer list of bottom-up-attention/MCAN, each annotation's
``multiple_choice_answer`` is normalised with the official rules
(``vqa.data.answer_normalization.normalize_answer``) and answers given for at least ``min_count``
questions are kept (MCAN's "more than 8" is ``min_count=9``; on VQA v2 train+val this yields 3129
answers). Order: decreasing count, ties alphabetical.

Soft scores: the target of answer ``c`` for a question is the **official VQA accuracy the metric
would give to predicting ``c``** (``vqa.metrics.vqa_eval.question_accuracy``: leave-one-out
``min(1, matches/3)`` averaged over annotators, ground truth handled exactly as at evaluation).
This is the most faithful rule: the loss then rewards exactly what the score rewards, including
the metric's quirks (e.g. when all ten annotators wrote "two", the official script compares the
prediction unnormalised, so the normalised candidate "2" scores, and gets a target, of zero). With
ten annotators the leave-one-out average equals ``min(1, 0.3 * matches)`` (0.3, 0.6, 0.9, 1.0 for 1,
2, 3, 4+ matches), the formula of several code bases; the two differ in which strings count as
matches (the metric's ground-truth handling) and for questions with other than ten answers.
Candidates are the normalised answers of the question's annotators that are in the vocabulary.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Union

import torch

from vqa.data.answer_normalization import normalize_answer
from vqa.data.json_files import DataFormatError, JsonSource, read_json, require_keys
from vqa.metrics.vqa_eval import question_accuracy

AnswerRecords = Sequence[Union[str, Mapping[str, Any]]]


def _annotation_entries(
    sources: Union[JsonSource, Sequence[JsonSource]],
) -> List[Mapping[str, Any]]:
    """Entries of one VQA annotations file (path or loaded dict) or of a list of such files."""
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    entries: List[Mapping[str, Any]] = []
    for source in items:
        loaded = read_json(source, "VQA annotations")
        if not isinstance(loaded, Mapping) or not isinstance(loaded.get("annotations"), list):
            raise DataFormatError(
                "VQA annotations must be a JSON object with an 'annotations' list"
            )
        entries.extend(loaded["annotations"])
    return entries


def answer_scores(answers: AnswerRecords) -> Dict[str, float]:
    """Soft score of every distinct normalised answer of one question (see module docstring).

    ``answers`` are the question's annotation records (``{"answer": ...}``) or strings.
    Answers that score 0 (e.g. against all-identical raw ground truth) are left out.
    """
    raw = [a if isinstance(a, str) else str(a.get("answer", "")) for a in answers]
    scores = {}
    for candidate in dict.fromkeys(normalize_answer(a) for a in raw):
        score = question_accuracy(candidate, answers)
        if score > 0:
            scores[candidate] = score
    return scores


class AnswerVocab:
    """The classifier's answer list: ``len``, ``index(answer)``, ``answers[i]``, soft targets."""

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers: List[str] = list(answers)
        self._index: Dict[str, int] = {a: i for i, a in enumerate(self.answers)}
        if len(self._index) != len(self.answers):
            raise ValueError("answer vocabulary entries must be unique")
        if not self.answers:
            raise ValueError("the answer vocabulary is empty")

    @classmethod
    def build(
        cls, annotations: Union[JsonSource, Sequence[JsonSource]], min_count: int = 9
    ) -> "AnswerVocab":
        """Answers whose normalised ``multiple_choice_answer`` occurs ``>= min_count`` times.

        ``annotations``: one VQA annotations file (path or loaded dict) or a list of them
        (e.g. train and val, as MCAN does).
        """
        counts: Counter = Counter()
        for position, entry in enumerate(_annotation_entries(annotations)):
            require_keys(entry, ("multiple_choice_answer",), f"annotation #{position}")
            counts[normalize_answer(str(entry["multiple_choice_answer"]))] += 1
        counts.pop("", None)  # an answer that normalises to nothing cannot be predicted usefully
        kept = sorted(
            (a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a)
        )
        if not kept:
            most = counts.most_common(1)
            raise DataFormatError(
                f"no answer occurs at least {min_count} times (most frequent: "
                f"{most[0] if most else 'none'}); lower min_count"
            )
        return cls(kept)

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return answer in self._index

    def index(self, answer: str) -> int:
        """Id of an already normalised answer (``KeyError`` if not in the vocabulary)."""
        return self._index[answer]

    def target(self, answers: AnswerRecords) -> torch.Tensor:
        """``[len(self)]`` float32 soft target of one question's annotator answers."""
        target = torch.zeros(len(self.answers), dtype=torch.float32)
        for answer, score in answer_scores(answers).items():
            i = self._index.get(answer)
            if i is not None:
                target[i] = score
        return target

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        Path(path).write_text(
            json.dumps({"answers": self.answers}, ensure_ascii=False, indent=0), encoding="utf-8"
        )

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "AnswerVocab":
        data = read_json(path, "answer vocabulary")
        if not isinstance(data, Mapping) or not isinstance(data.get("answers"), list):
            raise DataFormatError(
                f"{path} is not an answer vocabulary file "
                "(expected a JSON object with an 'answers' list)"
            )
        return cls(data["answers"])
