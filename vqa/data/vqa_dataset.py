"""VQA v2 questions (+ optional annotations) joined with stored image features.

One item per question: the encoded question, the image's rows (``vqa.data.image_rows``) and,
when annotations and an answer vocabulary are given, the soft target
(``vqa.data.answer_vocab``). Test splits have no annotations: items then have no target and
``collate`` leaves ``target`` out of the batch.

Everything that can be checked up front is checked in ``__init__`` (file shapes, questions
without annotations, images missing from the store), so a typo fails in a second with a clear
message instead of hours into an epoch.

Typical use::

    vocab = WordVocab.from_questions("train_questions.json")
    answers = AnswerVocab.build(["train_annotations.json", "val_annotations.json"], min_count=9)
    train = VQADataset("train_questions.json", "feats.h5", vocab,
                       annotations="train_annotations.json", answer_vocab=answers, max_rows=100)
    loader = DataLoader(train, batch_size=64, shuffle=True, collate_fn=train.collate)
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Union

import torch
from torch.utils.data import Dataset

from vqa.data.answer_vocab import AnswerVocab
from vqa.data.collate import collate_vqa
from vqa.data.image_rows import ImageRowReader, StoreLike, as_row_reader, find_missing_images
from vqa.data.json_files import DataFormatError, JsonSource, read_json, require_keys

log = logging.getLogger(__name__)

MCAN_MAX_QUESTION_LENGTH = 14


class QuestionEncoder(Protocol):
    """What the dataset needs from ``WordVocab`` or ``HFQuestionTokenizer``."""

    pad_id: int

    def encode(self, text: str, max_length: Optional[int] = None) -> List[int]: ...


class VQADataset(Dataset):
    """Items: ``{"question_id", "image_id", "question" [L], "rows", "target" [A] (optional)}``."""

    def __init__(
        self,
        questions: JsonSource,
        features: Union[ImageRowReader, StoreLike],
        question_encoder: QuestionEncoder,
        annotations: Optional[JsonSource] = None,
        answer_vocab: Optional[AnswerVocab] = None,
        max_question_length: int = MCAN_MAX_QUESTION_LENGTH,
        max_rows: Optional[int] = None,
        missing_images: str = "error",
    ) -> None:
        self.question_encoder = question_encoder
        self.answer_vocab = answer_vocab
        self.max_question_length = max_question_length
        self.rows = as_row_reader(features, max_rows)
        self.entries = _question_entries(read_json(questions, "VQA questions"))
        self.answers: Optional[Dict[Any, Sequence[Any]]] = None
        if annotations is not None:
            self.answers = _answers_by_question(
                read_json(annotations, "VQA annotations"), self.entries
            )
        missing = find_missing_images(
            self.rows, (e["image_id"] for e in self.entries), missing_images, "questions"
        )
        if missing:
            before = len(self.entries)
            self.entries = [e for e in self.entries if e["image_id"] not in missing]
            log.warning(
                "skipping %d of %d questions: %d image(s) are not in the feature store",
                before - len(self.entries),
                before,
                len(missing),
            )
        if not self.entries:
            raise DataFormatError("the VQA dataset has no questions to serve")

    @property
    def question_ids(self) -> List[Any]:
        return [e["question_id"] for e in self.entries]

    @property
    def has_targets(self) -> bool:
        return self.answers is not None and self.answer_vocab is not None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        entry = self.entries[index]
        ids = self.question_encoder.encode(entry["question"], self.max_question_length)
        item: Dict[str, Any] = {
            "question_id": entry["question_id"],
            "image_id": entry["image_id"],
            "question": torch.tensor(ids, dtype=torch.long),
            "rows": self.rows.read(entry["image_id"]),
        }
        if self.has_targets:
            item["target"] = self.answer_vocab.target(self.answers[entry["question_id"]])
        return item

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        """``collate_vqa`` with this dataset's question padding id (use as ``collate_fn``)."""
        return collate_vqa(items, question_pad_id=int(self.question_encoder.pad_id))


def _question_entries(questions: Any) -> List[Dict[str, Any]]:
    if not isinstance(questions, Mapping) or not isinstance(questions.get("questions"), list):
        raise DataFormatError("VQA questions must be a JSON object with a 'questions' list")
    entries = []
    for position, entry in enumerate(questions["questions"]):
        require_keys(entry, ("question_id", "image_id", "question"), f"question #{position}")
        if not isinstance(entry["question"], str):
            raise DataFormatError(f"question #{position}: 'question' must be a string")
        entries.append(
            {
                "question_id": entry["question_id"],
                "image_id": entry["image_id"],
                "question": entry["question"],
            }
        )
    return entries


def _answers_by_question(
    annotations: Any, entries: Sequence[Mapping[str, Any]]
) -> Dict[Any, Sequence[Any]]:
    if not isinstance(annotations, Mapping) or not isinstance(annotations.get("annotations"), list):
        raise DataFormatError("VQA annotations must be a JSON object with an 'annotations' list")
    answers = {}
    for position, entry in enumerate(annotations["annotations"]):
        require_keys(entry, ("question_id", "answers"), f"annotation #{position}")
        if not isinstance(entry["answers"], list) or not entry["answers"]:
            raise DataFormatError(f"annotation #{position}: 'answers' must be a non-empty list")
        answers[entry["question_id"]] = entry["answers"]
    unanswered = [e["question_id"] for e in entries if e["question_id"] not in answers]
    if unanswered:
        raise DataFormatError(
            f"{len(unanswered)} question(s) have no annotation (e.g. "
            f"{', '.join(map(repr, unanswered[:5]))}): the questions and annotations files do "
            f"not belong together"
        )
    return answers
