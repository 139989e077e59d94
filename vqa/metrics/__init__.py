"""Evaluation of the VQA and captioning heads.

``evaluate_vqa`` (official VQA/VizWiz accuracy, pure Python) and ``evaluate_captions`` (COCO
caption metrics; needs ``pycocoevalcap`` and Java, imported only when called).
"""

from vqa.metrics.vqa_eval import VQAEvalError, evaluate_vqa, question_accuracy


def evaluate_captions(annotations_json, results, use_spice=None):
    """See ``vqa.metrics.caption_eval.evaluate_captions`` (imported lazily: Java toolkit)."""
    from vqa.metrics.caption_eval import evaluate_captions as _evaluate

    return _evaluate(annotations_json, results, use_spice=use_spice)


__all__ = ["VQAEvalError", "evaluate_captions", "evaluate_vqa", "question_accuracy"]
