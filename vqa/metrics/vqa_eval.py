"""Official VQA accuracy (VQA v1/v2 and VizWiz), reimplemented to give the same numbers.

Why a reimplementation rather than the script: the official ``vqaEval.py`` (GT-Vision-Lab/VQA)
prints progress bars, mutates its inputs and fails with bare asserts; a training loop needs a
function. Every rule that changes a number is kept (the text rules are in
``vqa.data.answer_normalization``, which also lists what differs between the revisions).

``official`` picks the script reproduced (``OFFICIAL_VERSIONS``):

* ``"vqa-py3"`` (default): ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at c4e6a0e, the
  current revision and the only one that runs on Python 3;
* ``"vqa-py2-07aecec"``: the same file at 07aecec (VQA v1.0 release), as Python 2 runs it.

Rules common to both:

* prediction: ``\\n``/``\\t`` to spaces, strip, ``process_punctuation``, ``process_digit_article``;
* ground truth: only when the 10 answers are not all identical, each goes through
  ``process_punctuation`` (never ``process_digit_article``); otherwise they stay raw;
* per ground-truth answer ``g``: ``acc_g = min(1, #(other answers == prediction) / 3)``, "other"
  meaning every answer record not equal to ``g``'s record; the question scores the mean of the
  ``acc_g``; ``overall`` is ``100 * sum / n`` over questions rounded to 2 decimals.

What differs (besides the text rules):

* ``perQuestionType``/``perAnswerType``: c4e6a0e averages each question's mean; 07aecec averages
  the ``acc_g`` of the question's **last** ground-truth answer (the loop variable it leaves over);
* question order (it changes the floating-point sums, so rarely the last digit): c4e6a0e walks the
  annotation file (``vqa.getQuesIds()``), 07aecec the results file (``vqaRes.getQuesIds()``);
* rounding: Python 3's ``round`` rounds exact ties to even, Python 2's away from zero
  (97 of 800 questions right: 12.125 -> 12.12 with c4e6a0e, 12.13 with 07aecec);
* Python 2 text: a prediction that 07aecec turns into a non-ASCII byte string matches nothing,
  or stops the script (``UnicodeDecodeError``): that is a ``VQAEvalError`` here.
* result files: c4e6a0e's ``loadRes`` requires exactly the annotated questions and checks
  "Multiple Choice" answers against the questions file; 07aecec accepted any subset and had no
  such check. Here both versions apply the c4e6a0e checks (a file the old loader would take is
  scored with ``allow_missing=True``).

VizWiz (annotations are a JSON list of ``{"image", "answers", "answer_type", ...}``, results
``[{"image", "answer"}]``) follows its own script whatever ``official`` says: the same prediction
normalisation (``"vizwiz"`` rules: the c4e6a0e punctuation list, the typographic 07aecec
contraction table, Python 3) and formula, ground-truth answers compared raw, "other" meaning the
other positions, ``perAnswerType`` averaging question means, annotation order; it has no question
types (``perQuestionType`` is empty).

Result files must answer exactly the annotated questions, once each: a missing or unknown id is
an error (``VQAEvalError``) with the counts and a few example ids. ``allow_missing=True`` relaxes
only the "missing" half.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Union

from vqa.data.answer_normalization import (
    DEFAULT_OFFICIAL,
    OFFICIAL_VERSIONS,
    VIZWIZ,
    VQA_PY2_07AECEC,
    VQA_PY3,
    Python2TextError,
    answer_rules,
    official_prediction,
    process_punctuation,
)
from vqa.data.json_files import DataFormatError, JsonSource, read_json, require_keys

_DIGITS = 2  # the script's ``n``: every reported number is rounded to 2 decimals


@dataclass(frozen=True)
class _ScriptFacts:
    """How one official script aggregates (its text rules live in ``answer_normalization``)."""

    per_type_last_answer: bool  # per-type tables average the last annotator's acc, not the mean
    results_order: bool  # questions are walked in results-file order, not annotation order


_SCRIPT_FACTS = {
    VQA_PY3: _ScriptFacts(per_type_last_answer=False, results_order=False),
    VQA_PY2_07AECEC: _ScriptFacts(per_type_last_answer=True, results_order=True),
}


class VQAEvalError(DataFormatError):
    """Results that cannot be scored against the annotations (missing/extra/duplicate ids...)."""


AnswerRecord = Union[str, Mapping[str, Any]]


def _answer_records(answers: Sequence[AnswerRecord]) -> List[Dict[str, Any]]:
    """Copies the answer records (the caller's data is never modified, unlike the script).

    Plain strings get their position as ``answer_id`` so that two annotators giving the same
    answer stay distinct records, as they are in real annotation files.
    """
    records = []
    for position, item in enumerate(answers):
        if isinstance(item, str):
            records.append({"answer": item, "answer_id": position + 1})
        elif isinstance(item, Mapping) and isinstance(item.get("answer"), str):
            records.append(dict(item))
        else:
            raise DataFormatError(
                f"a ground-truth answer must be a string or an object with a string 'answer', "
                f"got {item!r}"
            )
    return records


def _check_official(official: str) -> None:
    if official not in OFFICIAL_VERSIONS:
        raise ValueError(
            f"unknown official VQA script {official!r}; choose one of "
            f"{', '.join(map(repr, OFFICIAL_VERSIONS))}"
        )


def leave_one_out_accuracies(
    prediction: str, answers: Sequence[AnswerRecord], official: str = DEFAULT_OFFICIAL
) -> List[float]:
    """The official per-annotator accuracies ``acc_g`` of one raw predicted answer (VQA rules).

    ``answers`` are the question's ground-truth answer records (``{"answer": ..., ...}``) or
    strings. The question's accuracy is their mean; the last one is what the 07aecec script's
    per-type tables average. Raises ``Python2TextError`` (a ``ValueError``) for a prediction the
    07aecec script cannot process under Python 2.
    """
    _check_official(official)
    if not answers:
        raise DataFormatError("a question needs at least one ground-truth answer to be scored")
    predicted = official_prediction(prediction, official)  # None: equals no answer (Python 2)
    records = _answer_records(answers)
    if len({record["answer"] for record in records}) > 1:
        for record in records:
            record["answer"] = process_punctuation(record["answer"], official)
    accuracies = []
    for record in records:
        matches = sum(1 for other in records if other != record and other["answer"] == predicted)
        accuracies.append(min(1.0, matches / 3))
    return accuracies


def vizwiz_leave_one_out_accuracies(prediction: str, answers: Sequence[str]) -> List[float]:
    """VizWiz's per-annotator accuracies: raw ground truth, "other" = the other positions."""
    if not answers:
        raise DataFormatError("a question needs at least one ground-truth answer to be scored")
    predicted = official_prediction(prediction, VIZWIZ)
    accuracies = []
    for position in range(len(answers)):
        matches = sum(
            1 for other, answer in enumerate(answers) if other != position and answer == predicted
        )
        accuracies.append(min(1.0, matches / 3))
    return accuracies


def question_accuracy(
    prediction: str, answers: Sequence[AnswerRecord], official: str = DEFAULT_OFFICIAL
) -> float:
    """Official VQA accuracy in ``[0, 1]`` of one prediction (for validation inside training)."""
    accuracies = leave_one_out_accuracies(prediction, answers, official)
    return sum(accuracies) / len(accuracies)


def round_half_away_from_zero(value: float, digits: int) -> float:
    """Python 2.7's ``round(value, digits)``: the exact binary value, ties away from zero.

    Python 3's ``round`` sends exact ties to the even neighbour (``round(12.125, 2) == 12.12``,
    Python 2 gives 12.13); both look at the exact value, so ``2.675`` (stored just below) gives
    2.67 on both.
    """
    quantum = Decimal(1).scaleb(-digits)
    return float(Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP))


def _percent(values: Sequence[float], python2: bool = False) -> float:
    # Same arithmetic as the script's setAccuracy: round(100*float(sum(a))/len(a), n), with the
    # round() of the Python the script runs on.
    value = 100 * float(sum(values)) / len(values)
    return round_half_away_from_zero(value, _DIGITS) if python2 else round(value, _DIGITS)


def _describe_ids(ids: Sequence[Hashable], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in sorted(ids, key=str)[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def _index_results(results: Any, key: str) -> Dict[Hashable, str]:
    """``{id: raw answer}`` in file order; rejects malformed entries and duplicate ids."""
    if not isinstance(results, list):
        raise VQAEvalError(
            f"results must be a JSON list of {{{key!r}, 'answer'}} objects, "
            f"got {type(results).__name__}"
        )
    answers: Dict[Hashable, str] = {}
    duplicates = []
    for position, entry in enumerate(results):
        require_keys(entry, (key, "answer"), f"result #{position}")
        if not isinstance(entry["answer"], str):
            raise VQAEvalError(
                f"result #{position} ({key} {entry[key]!r}): 'answer' must be a "
                f"string, got {type(entry['answer']).__name__}"
            )
        if entry[key] in answers:
            duplicates.append(entry[key])
        answers[entry[key]] = entry["answer"]
    if duplicates:
        raise VQAEvalError(
            f"results answer {len(duplicates)} {key}(s) more than once: {_describe_ids(duplicates)}"
        )
    return answers


def _check_same_ids(
    annotated: Sequence[Hashable],
    answered: Mapping[Hashable, str],
    key: str,
    allow_missing: bool = False,
) -> None:
    missing = set() if allow_missing else set(annotated) - set(answered)
    extra = set(answered) - set(annotated)
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} annotated {key}(s) have no prediction "
                f"({_describe_ids(list(missing))})"
            )
        if extra:
            parts.append(
                f"{len(extra)} predicted {key}(s) are not in the annotations "
                f"({_describe_ids(list(extra))})"
            )
        raise VQAEvalError("results do not correspond to the annotation set: " + "; ".join(parts))


def _check_questions(
    questions: Any,
    annotations: Mapping[Hashable, Mapping[str, Any]],
    answered: Mapping[Hashable, str],
) -> None:
    """Catches a questions file from another split; enforces multiple-choice answers."""
    if not isinstance(questions, Mapping) or not isinstance(questions.get("questions"), list):
        raise VQAEvalError("VQA questions must be a JSON object with a 'questions' list")
    by_id = {}
    for position, entry in enumerate(questions["questions"]):
        require_keys(entry, ("question_id",), f"question #{position}")
        by_id[entry["question_id"]] = entry
    unknown = set(annotations) - set(by_id)
    if unknown:
        raise VQAEvalError(
            f"the questions file does not match the annotations: {len(unknown)} "
            f"annotated question_id(s) are not in it ({_describe_ids(list(unknown))})"
        )
    if questions.get("task_type") == "Multiple Choice":
        for question_id, answer in answered.items():
            choices = by_id[question_id].get("multiple_choices", [])
            if answer not in choices:
                raise VQAEvalError(
                    f"question_id {question_id!r}: predicted answer {answer!r} is "
                    f"not one of its multiple choices"
                )


def _question_order(
    by_id: Mapping[Hashable, Any], answered: Mapping[Hashable, str], facts: _ScriptFacts
) -> List[Hashable]:
    """The ids in the order the script walks them (its sums, hence last digits, depend on it)."""
    if facts.results_order:
        return list(answered)
    return [question_id for question_id in by_id if question_id in answered]


def _evaluate_vqa_v2(
    annotations: Mapping[str, Any], questions: Any, results: Any, official: str, allow_missing: bool
) -> Dict[str, Any]:
    entries = annotations["annotations"]
    if not isinstance(entries, list):
        raise VQAEvalError("VQA annotations: 'annotations' must be a list")
    by_id: Dict[Hashable, Mapping[str, Any]] = {}
    for position, entry in enumerate(entries):
        require_keys(
            entry,
            ("question_id", "answers", "question_type", "answer_type"),
            f"annotation #{position}",
        )
        by_id[entry["question_id"]] = entry
    answered = _index_results(results, "question_id")
    _check_same_ids(list(by_id), answered, "question_id", allow_missing)
    if not answered:
        raise VQAEvalError("the results are empty: nothing to evaluate")
    if questions is not None:
        _check_questions(questions, by_id, answered)

    facts = _SCRIPT_FACTS[official]
    python2 = answer_rules(official).python2
    overall: List[float] = []
    per_question_type: Dict[str, List[float]] = {}
    per_answer_type: Dict[str, List[float]] = {}
    for question_id in _question_order(by_id, answered, facts):
        entry = by_id[question_id]
        try:
            accuracies = leave_one_out_accuracies(answered[question_id], entry["answers"], official)
        except Python2TextError as error:
            raise VQAEvalError(
                f"question_id {question_id!r}: {error}; score with official={VQA_PY3!r}"
            ) from None
        mean = float(sum(accuracies)) / len(accuracies)
        overall.append(mean)
        typed = accuracies[-1] if facts.per_type_last_answer else mean
        per_question_type.setdefault(entry["question_type"], []).append(typed)
        per_answer_type.setdefault(entry["answer_type"], []).append(typed)
    return {
        "overall": _percent(overall, python2),
        "perQuestionType": {name: _percent(v, python2) for name, v in per_question_type.items()},
        "perAnswerType": {name: _percent(v, python2) for name, v in per_answer_type.items()},
    }


def _evaluate_vizwiz(entries: List[Any], results: Any, allow_missing: bool) -> Dict[str, Any]:
    by_image: Dict[Hashable, Mapping[str, Any]] = {}
    for position, entry in enumerate(entries):
        require_keys(entry, ("image", "answers", "answer_type"), f"VizWiz annotation #{position}")
        by_image[entry["image"]] = entry
    answered = _index_results(results, "image")
    _check_same_ids(list(by_image), answered, "image", allow_missing)
    if not answered:
        raise VQAEvalError("the results are empty: nothing to evaluate")

    overall: List[float] = []
    per_answer_type: Dict[str, List[float]] = {}
    for image, entry in by_image.items():  # VizWiz's script walks the annotations in order
        if image not in answered:
            continue  # allow_missing: scored on the answered subset
        prediction = answered[image]
        answers = [record["answer"] for record in _answer_records(entry["answers"])]
        accuracies = vizwiz_leave_one_out_accuracies(prediction, answers)
        mean = float(sum(accuracies)) / len(accuracies)
        overall.append(mean)
        per_answer_type.setdefault(entry["answer_type"], []).append(mean)
    return {
        "overall": _percent(overall),
        "perQuestionType": {},
        "perAnswerType": {name: _percent(v) for name, v in per_answer_type.items()},
    }


def evaluate_vqa(
    annotations: JsonSource,
    questions: Optional[JsonSource],
    results: JsonSource,
    official: str = DEFAULT_OFFICIAL,
    allow_missing: bool = False,
) -> Dict[str, Any]:
    """Official accuracy of ``results`` -> ``{"overall", "perQuestionType", "perAnswerType"}``.

    Each argument is a path or the loaded JSON. ``annotations`` is a VQA annotation file (a dict
    with ``"annotations"``) or a VizWiz file (a list; ``questions`` is then unused and may be
    None). ``questions``, when given for VQA, must contain every annotated question (this catches
    a file pair from different splits) and enforces the choices of a "Multiple Choice" task.
    Numbers are percentages rounded to 2 decimals. ``official`` names the official script whose
    numbers are reproduced: ``"vqa-py3"`` (default, the current GT-Vision-Lab/VQA script) or
    ``"vqa-py2-07aecec"`` (the VQA v1.0 Python 2 script); see the module docstring for what
    differs. VizWiz files always follow VizWiz's script and accept only the default.
    ``allow_missing=True`` scores the answered subset (e.g. validation on the questions whose
    images were extracted; the 07aecec ``loadRes`` allowed this too); unknown ids stay an error.
    Raises ``VQAEvalError`` (a ``ValueError``) with a specific message on any mismatch.
    """
    _check_official(official)
    loaded_annotations = read_json(annotations, "VQA annotations")
    loaded_results = read_json(results, "VQA results")
    if isinstance(loaded_annotations, list):
        if official != DEFAULT_OFFICIAL:
            raise VQAEvalError(
                f"official={official!r} names a VQA script; VizWiz annotations "
                f"are scored with VizWiz's own script (leave official unset)"
            )
        if not loaded_annotations:
            raise VQAEvalError("the VizWiz annotations are empty: nothing to evaluate")
        return _evaluate_vizwiz(loaded_annotations, loaded_results, allow_missing)
    if not isinstance(loaded_annotations, Mapping) or "annotations" not in loaded_annotations:
        raise VQAEvalError(
            "VQA annotations must be a JSON object with an 'annotations' list "
            "(VQA) or a JSON list (VizWiz)"
        )
    if not loaded_annotations["annotations"]:
        raise VQAEvalError("the VQA annotations are empty: nothing to evaluate")
    loaded_questions = None if questions is None else read_json(questions, "VQA questions")
    return _evaluate_vqa_v2(
        loaded_annotations, loaded_questions, loaded_results, official, allow_missing
    )
