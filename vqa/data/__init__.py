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

Names used by the engine and CLIs are re-exported here.
"""
from vqa.data.answer_normalization import normalize_answer
from vqa.data.answer_vocab import AnswerVocab, answer_scores
from vqa.data.caption_dataset import CaptionDataset
from vqa.data.collate import collate_captions, collate_vqa
from vqa.data.hf_tokenizer import HFQuestionTokenizer
from vqa.data.image_rows import ImageRowReader, ImageRows
from vqa.data.json_files import DataFormatError, read_json
from vqa.data.text import tokenize
from vqa.data.vqa_dataset import VQADataset
from vqa.data.word_vectors import load_word_vectors
from vqa.data.word_vocab import CAPTION_SPECIALS, QUESTION_SPECIALS, WordVocab

__all__ = [
    "AnswerVocab", "CAPTION_SPECIALS", "CaptionDataset", "DataFormatError", "HFQuestionTokenizer",
    "ImageRowReader", "ImageRows", "QUESTION_SPECIALS", "VQADataset", "WordVocab",
    "answer_scores", "collate_captions", "collate_vqa", "load_word_vectors", "normalize_answer",
    "read_json", "tokenize",
]
