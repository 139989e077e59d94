"""Data for the VQA and captioning heads: answer normalisation, vocabularies, datasets, collate.

Modules (each with one job):
  answer_normalization  the official VQA answer normalisation (shared with the metric)
  json_files            path-or-loaded JSON reading with clear errors
"""
