"""Data for the VQA and captioning heads: answer normalisation, vocabularies, datasets, collate.

Modules (each with one job):
  answer_normalization  the official VQA answer normalisation (shared with the metric)
  answer_vocab          AnswerVocab (min-count answer list) and official soft-score targets
  text                  tokenize(): the one word tokeniser for questions and captions
  word_vocab            WordVocab (question / caption vocabularies, <pad>=0, <bos>/<eos>)
  word_vectors          load_word_vectors(): GloVe/word2vec text file -> embedding matrix
  hf_tokenizer          HFQuestionTokenizer: a local Hugging Face tokenizer (never downloaded)
  image_rows            ImageRowReader: feature-store rows + normalised boxes, max_rows fitting
  vqa_dataset           VQADataset (questions, optional annotations, features)
  caption_dataset       CaptionDataset (COCO captions, training and per-image views)
  collate               collate_vqa / collate_captions: dicts of padded tensors and masks
  json_files            path-or-loaded JSON reading with clear errors (DataFormatError)

Names used by the engine and CLIs are re-exported here, imported on first use: the metrics
import ``answer_normalization`` and ``json_files`` from this package while ``answer_vocab``
imports the metric, so an eager ``__init__`` would make that a circular import (and would load
torch for a plain ``import vqa.data``).
"""

import importlib
from typing import Any

_LAZY = {
    "normalize_answer": "vqa.data.answer_normalization",
    "AnswerVocab": "vqa.data.answer_vocab",
    "answer_scores": "vqa.data.answer_vocab",
    "CaptionDataset": "vqa.data.caption_dataset",
    "collate_captions": "vqa.data.collate",
    "collate_vqa": "vqa.data.collate",
    "HFQuestionTokenizer": "vqa.data.hf_tokenizer",
    "ImageRowReader": "vqa.data.image_rows",
    "ImageRows": "vqa.data.image_rows",
    "DataFormatError": "vqa.data.json_files",
    "read_json": "vqa.data.json_files",
    "tokenize": "vqa.data.text",
    "VQADataset": "vqa.data.vqa_dataset",
    "load_word_vectors": "vqa.data.word_vectors",
    "CAPTION_SPECIALS": "vqa.data.word_vocab",
    "QUESTION_SPECIALS": "vqa.data.word_vocab",
    "WordVocab": "vqa.data.word_vocab",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqa.data' has no attribute {name!r}")
