"""The VQA head as a training task: data from the config, BCE loss, official validation accuracy.

Config (``configs/vqa/*.yaml``; paths are relative to the working directory)::

    model: {name: pythia | mcan, ...constructor options of vqa.models}
    data:
      features: feats.h5            # gridfeats feature store, grid or region mode
      train_questions / train_annotations / val_questions / val_annotations: VQA v2 json files
      answer_vocab_from: [train]    # annotation sets the answer list is built from ([train, val]
                                    # as MCAN does when val is not used for model selection)
      min_answer_count: 9           # MCAN's "more than 8" (3129 answers on VQA v2 train+val)
      min_word_count: 1, max_question_length: 14, max_rows: 100
      row_cache_mb: 1024            # decoded feature rows kept in memory, per process
      feature_norm: none            # or standardize (per-channel, training statistics)
      word_vectors: null            # a GloVe-format text file to initialise word embeddings
      hf_tokenizer: null            # a local tokenizer dir, to use with model.text_encoder
      missing_images: error         # or skip
    loss: {reduction: sum | batch_mean}   # MCAN sums; mmf/Pythia averages over the batch

The vocabularies are stored in every checkpoint, so ``predict`` needs only the checkpoint, a
feature store and a questions file.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gridfeats.engine import move_to_device
from vqa.data import (
    AnswerVocab,
    DataFormatError,
    HFQuestionTokenizer,
    VQADataset,
    WordVocab,
    load_word_vectors,
    normalize_answer,
    read_json,
)
from vqa.data.image_rows import open_row_reader, task_row_normalization
from vqa.metrics import evaluate_vqa
from vqa.models import build_vqa_model

VQA_DEFAULTS: Dict[str, Any] = {
    "data": {
        "features": None,
        "train_questions": None,
        "train_annotations": None,
        "val_questions": None,
        "val_annotations": None,
        "answer_vocab_from": ["train"],
        "min_answer_count": 9,
        "min_word_count": 1,
        "max_question_length": 14,
        "max_rows": 100,
        "row_cache_mb": 1024,
        "feature_norm": "none",
        "word_vectors": None,
        "hf_tokenizer": None,
        "missing_images": "error",
    },
    "loss": {"reduction": "batch_mean"},
}
LOSS_REDUCTIONS = ("sum", "batch_mean")


def _require(data_cfg: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if not data_cfg.get(k)]
    if missing:
        raise DataFormatError("the config lacks " + ", ".join(f"data.{k}" for k in missing))


def _vocab_state(vocab: WordVocab) -> Dict[str, List[str]]:
    return {"specials": list(vocab.specials), "words": vocab.itos[len(vocab.specials) :]}


def vqa_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """BCE-with-logits over soft scores, summed over answers (and over the batch for ``sum``)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss.reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return loss if reduction == "sum" else loss / logits.shape[0]


def majority_answer(annotations: Any) -> str:
    """The most frequent normalised ``multiple_choice_answer`` (the majority baseline)."""
    loaded = read_json(annotations, "VQA annotations")
    counts = Counter(
        normalize_answer(str(a["multiple_choice_answer"])) for a in loaded["annotations"]
    )
    return sorted(counts, key=lambda a: (-counts[a], a))[0]


class VQATask:
    """Builds vocabularies, datasets and the model from a config (or from a checkpoint)."""

    kind = "vqa"

    def __init__(
        self,
        cfg: Mapping[str, Any],
        state: Optional[Mapping[str, Any]] = None,
        features: Optional[str] = None,
        for_training: bool = True,
    ) -> None:
        self.cfg = cfg
        data = cfg["data"]
        self.features_path, self.reader = open_row_reader(data, features)
        if state is not None:
            self.question_vocab = WordVocab(**state["question_vocab"])
            self.answer_vocab = AnswerVocab(state["answers"])
            feature_dim = int(state["feature_dim"])
            if self.reader.feature_dim != feature_dim:
                raise DataFormatError(
                    f"the feature store {self.features_path} has {self.reader.feature_dim}-d "
                    f"features but the model was trained on {feature_dim}-d features"
                )
        else:
            _require(data, "train_questions", "train_annotations")
            self.question_vocab = WordVocab.from_questions(
                data["train_questions"], min_count=int(data["min_word_count"])
            )
            sources = [data[f"{split}_annotations"] for split in data["answer_vocab_from"]]
            if any(not s for s in sources):
                raise DataFormatError("data.answer_vocab_from names a split without annotations")
            self.answer_vocab = AnswerVocab.build(sources, min_count=int(data["min_answer_count"]))
        self.feature_norm = task_row_normalization(
            data, self.reader, state, lambda: self._image_ids(data["train_questions"])
        )
        self.question_encoder = (
            HFQuestionTokenizer(data["hf_tokenizer"])
            if data["hf_tokenizer"]
            else self.question_vocab
        )
        vocab_size = len(self.question_encoder)
        word_vectors = None
        if data["word_vectors"] and state is None and not data["hf_tokenizer"]:
            word_dim = int(cfg["model"].get("word_dim", 300))
            word_vectors = load_word_vectors(data["word_vectors"], self.question_vocab, word_dim)
        self.model: nn.Module = build_vqa_model(
            cfg["model"], vocab_size, len(self.answer_vocab), self.reader.feature_dim, word_vectors
        )
        self.train_dataset = self._dataset("train", with_answers=True) if for_training else None
        self.val_dataset = None
        if for_training and data["val_questions"] and data["val_annotations"]:
            self.val_dataset = self._dataset("val", with_answers=True)

    @staticmethod
    def _image_ids(questions: Any) -> List[Any]:
        return [q["image_id"] for q in read_json(questions, "VQA questions")["questions"]]

    def _dataset(self, split: str, with_answers: bool) -> VQADataset:
        data = self.cfg["data"]
        return self.questions_dataset(
            data[f"{split}_questions"], data[f"{split}_annotations"] if with_answers else None
        )

    def questions_dataset(self, questions: Any, annotations: Any = None) -> VQADataset:
        data = self.cfg["data"]
        return VQADataset(
            questions,
            self.reader,
            self.question_encoder,
            annotations=annotations,
            answer_vocab=self.answer_vocab if annotations is not None else None,
            max_question_length=int(data["max_question_length"]),
            missing_images=data["missing_images"],
        )

    # ----------------------------------------------------------------- TrainingTask protocol
    def collate(self, items: List[Any]) -> Dict[str, Any]:
        return self.train_dataset.collate(items)

    def training_loss(self, model: nn.Module, batch: Dict[str, Any], epoch: int) -> torch.Tensor:
        logits = model(
            batch["feats"],
            batch["feat_mask"],
            batch["boxes"],
            batch["question"],
            batch["question_mask"],
        )
        return vqa_loss(logits, batch["target"], self.cfg["loss"]["reduction"])

    def evaluate(self, model: nn.Module) -> Dict[str, Any]:
        """Official accuracy on the validation split (``score`` = overall)."""
        if self.val_dataset is None:
            return {}
        data = self.cfg["data"]
        results = self.predict(model, self.val_dataset)
        metrics = evaluate_vqa(data["val_annotations"], data["val_questions"], results)
        return {"score": metrics["overall"], **metrics}

    def step_stats(self) -> Dict[str, float]:
        return {}

    def checkpoint_state(self) -> Dict[str, Any]:
        return {
            "question_vocab": _vocab_state(self.question_vocab),
            "answers": list(self.answer_vocab.answers),
            "feature_dim": self.reader.feature_dim,
            "feature_norm": self.feature_norm.state() if self.feature_norm else None,
        }

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(
        self, model: nn.Module, dataset: VQADataset, batch_size: Optional[int] = None
    ) -> List[Dict[str, Any]]:
        """``[{"question_id", "answer"}]`` for every question of ``dataset`` (official format)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loader = DataLoader(
            dataset,
            batch_size=batch_size or int(self.cfg["train"]["eval_batch_size"]),
            shuffle=False,
            collate_fn=dataset.collate,
            generator=torch.Generator(),
        )
        results = []
        for batch in loader:
            batch = move_to_device(batch, device)
            logits = model(
                batch["feats"],
                batch["feat_mask"],
                batch["boxes"],
                batch["question"],
                batch["question_mask"],
            )
            for question_id, index in zip(
                batch["question_id"].tolist(), logits.argmax(dim=1).tolist()
            ):
                results.append(
                    {"question_id": question_id, "answer": self.answer_vocab.answers[index]}
                )
        model.train(was_training)
        return results
