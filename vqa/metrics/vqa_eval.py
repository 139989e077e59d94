"""Official VQA accuracy (VQA v1/v2 and VizWiz), reimplemented to give the same numbers.

Why a reimplementation rather than the script: the official ``vqaEval.py`` (GT-Vision-Lab/VQA)
prints progress bars, mutates its inputs and fails with bare asserts; a training loop needs a
function. Every rule that changes a number is kept (the text rules are in
``vqa.data.answer_normalization``, which also lists the revisions' punctuation and contraction
tables); ``docs/vqa-eval.md`` puts the three revisions side by side.

``revision`` picks the revision of ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` reproduced
(``REVISIONS``; each is reproduced as run under Python 3 with only ``print`` converted, except
``beta-07aecec-py2``):

* ``"master-a013f00"`` (default): master today, a013f00 (2021-03, "Fixed processing answers
  bug"), the official script;
* ``"v2.0-a4f1afd"``: the VQA v2.0 script (a4f1afd, 2017), with the same rules as c4e6a0e on the
  never-merged ``feature/update_style`` branch (this project's old default, ``"vqa-py3"``);
* ``"beta-07aecec"``: the 2015 beta (07aecec) under Python 3;
* ``"beta-07aecec-py2"``: the same file as Python 2 runs it (the old ``"vqa-py2-07aecec"``).

Rules common to all of them:

* prediction: ``\\n``/``\\t`` to spaces, strip;
* per ground-truth answer record ``g``: ``acc_g = min(1, #(other records whose answer ==
  prediction) / 3)``, "other" meaning every answer record not equal (as a dict) to ``g``; the
  question scores the mean of the ``acc_g``; ``overall`` is ``round(100 * sum / n, 2)`` over the
  questions with the ``round`` of the Python the script runs on.

What master a013f00 changed (``_ScriptFacts``), step by step:

1. the ground-truth answers get ``\\n``/``\\t`` to spaces and strip too (the older revisions
   compare them unstripped), *before* the "all identical" test, so ``"yes\\n"`` and ``"yes"``
   count as identical;
2. when the answers are not all identical, each gets ``process_punctuation`` **and**
   ``process_digit_article`` (older: ``process_punctuation`` only, so a disagreeing ``"two"``
   never equalled a predicted ``"2"``), and so does the prediction;
3. when they are all identical nothing else happens: the prediction is compared as it is after
   the strip (older: always processed, so ``"Yes."`` scored 1 against ten ``"yes"``; master: 0).

What separates the 2015 beta from both later revisions (besides its text tables):

* ``perQuestionType``/``perAnswerType``: master and a4f1afd average each question's mean; 07aecec
  averages the ``acc_g`` of the question's **last** ground-truth answer (the loop variable it
  leaves over). ``overall`` is the mean of question means in all of them;
* question order (it changes the floating-point sums, so rarely the last digit): master and
  a4f1afd walk the annotation file (``vqa.getQuesIds()``), 07aecec the results file
  (``vqaRes.getQuesIds()``).

``beta-07aecec-py2`` adds Python 2's behaviour: ``round`` sends exact ties away from zero (97 of
800 questions right: 12.125 -> 12.13 there, 12.12 under Python 3), and a prediction that the
script turns into a non-ASCII byte string matches nothing, or stops the script
(``UnicodeDecodeError``): that is a ``VQAEvalError`` here.

Result files: c4e6a0e's ``loadRes`` (the loader the reference numbers were produced with) requires
exactly the annotated questions and checks "Multiple Choice" answers against the questions file;
every revision here applies those checks (07aecec's own loader accepted any subset: score such a
file with ``allow_missing=True``).

VizWiz (annotations are a JSON list of ``{"image", "answers", "answer_type", ...}``, results
``[{"image", "answer"}]``) follows its own script and takes no ``revision``: the same prediction
normalisation (``"vizwiz"`` rules: the 2017 punctuation list, the typographic 07aecec contraction
table, Python 3), always applied, and the same formula, ground-truth answers compared raw, "other"
meaning the other positions, ``perAnswerType`` averaging question means, annotation order; it has
no question types (``perQuestionType`` is empty).

Result files must answer exactly the annotated questions, once each: a missing or unknown id is
an error (``VQAEvalError``) with the counts and a few example ids. ``allow_missing=True`` relaxes
only the "missing" half.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Union

from vqa.data.answer_normalization import (
    BETA_07AECEC,
    BETA_07AECEC_PY2,
    DEFAULT_REVISION,
    MASTER_A013F00,
    REVISIONS,
    V2_A4F1AFD,
    VIZWIZ,
    Python2TextError,
    answer_rules,
    clean_whitespace,
    official_prediction,
    process_digit_article,
    process_punctuation,
    resolve_revision,
)
from vqa.data.json_files import DataFormatError, JsonSource, read_json, require_keys

_DIGITS = 2  # the script's ``n``: every reported number is rounded to 2 decimals


@dataclass(frozen=True)
class _ScriptFacts:
    """How one script revision scores and aggregates (its text tables: ``answer_normalization``)."""

    strip_ground_truth: bool  # gt answers get "\n"/"\t" -> " " and strip (before the identity test)
    ground_truth_digit_article: bool  # disagreeing gt answers get process_digit_article too
    raw_prediction_if_identical: (
        bool  # identical gt: the prediction is only stripped, not processed
    )
    per_type_last_answer: bool  # per-type tables average the last annotator's acc, not the mean
    results_order: bool  # questions are walked in results-file order, not annotation order


_MASTER = _ScriptFacts(
    strip_ground_truth=True,
    ground_truth_digit_article=True,
    raw_prediction_if_identical=True,
    per_type_last_answer=False,
    results_order=False,
)
_V2 = _ScriptFacts(
    strip_ground_truth=False,
    ground_truth_digit_article=False,
    raw_prediction_if_identical=False,
    per_type_last_answer=False,
    results_order=False,
)
_BETA = _ScriptFacts(
    strip_ground_truth=False,
    ground_truth_digit_article=False,
    raw_prediction_if_identical=False,
    per_type_last_answer=True,
    results_order=True,
)
_SCRIPT_FACTS = {
    MASTER_A013F00: _MASTER,
    V2_A4F1AFD: _V2,
    BETA_07AECEC: _BETA,
    BETA_07AECEC_PY2: _BETA,
}
assert set(_SCRIPT_FACTS) == set(REVISIONS)


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


def _vqa_revision(revision: str) -> str:
    """The canonical VQA revision name (aliases warn; VizWiz and unknown names are errors)."""
    return resolve_revision(revision, REVISIONS)


def leave_one_out_accuracies(
    prediction: str, answers: Sequence[AnswerRecord], revision: str = DEFAULT_REVISION
) -> List[float]:
    """The per-annotator accuracies ``acc_g`` of one raw predicted answer (VQA rules).

    ``answers`` are the question's ground-truth answer records (``{"answer": ..., ...}``) or
    strings. The question's accuracy is their mean; the last one is what the 07aecec script's
    per-type tables average. Raises ``Python2TextError`` (a ``ValueError``) for a prediction the
    07aecec script cannot process under Python 2.
    """
    revision = _vqa_revision(revision)
    facts = _SCRIPT_FACTS[revision]
    if not answers:
        raise DataFormatError("a question needs at least one ground-truth answer to be scored")
    records = _answer_records(answers)
    if facts.strip_ground_truth:
        for record in records:
            record["answer"] = clean_whitespace(record["answer"])
    identical = len({record["answer"] for record in records}) == 1
    predicted: Optional[str]  # None: equals no answer (Python 2 byte string)
    if identical and facts.raw_prediction_if_identical:
        predicted = clean_whitespace(prediction)
    else:
        predicted = official_prediction(prediction, revision)
    if not identical:
        for record in records:
            answer = process_punctuation(record["answer"], revision)
            if facts.ground_truth_digit_article:
                answer = process_digit_article(answer, revision)
            record["answer"] = answer
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
    prediction: str, answers: Sequence[AnswerRecord], revision: str = DEFAULT_REVISION
) -> float:
    """Official VQA accuracy in ``[0, 1]`` of one prediction (validation, soft-score targets)."""
    accuracies = leave_one_out_accuracies(prediction, answers, revision)
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
    annotations: Mapping[str, Any],
    questions: Any,
    results: Any,
    revision: str,
    allow_missing: bool,
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

    facts = _SCRIPT_FACTS[revision]
    python2 = answer_rules(revision).python2
    overall: List[float] = []
    per_question_type: Dict[str, List[float]] = {}
    per_answer_type: Dict[str, List[float]] = {}
    for question_id in _question_order(by_id, answered, facts):
        entry = by_id[question_id]
        try:
            accuracies = leave_one_out_accuracies(answered[question_id], entry["answers"], revision)
        except Python2TextError as error:
            raise VQAEvalError(
                f"question_id {question_id!r}: {error}; score with revision={BETA_07AECEC!r} "
                f"(the same script under Python 3) or the default {DEFAULT_REVISION!r}"
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
    revision: Optional[str] = None,
    allow_missing: bool = False,
) -> Dict[str, Any]:
    """Official accuracy of ``results`` -> ``{"overall", "perQuestionType", "perAnswerType"}``.

    Each argument is a path or the loaded JSON. ``annotations`` is a VQA annotation file (a dict
    with ``"annotations"``) or a VizWiz file (a list; ``questions`` is then unused and may be
    None). ``questions``, when given for VQA, must contain every annotated question (this catches
    a file pair from different splits) and enforces the choices of a "Multiple Choice" task.
    Numbers are percentages rounded to 2 decimals. ``revision`` names the revision of the
    official ``vqaEval.py`` whose numbers are reproduced (``REVISIONS``); ``None`` means the
    official script today, master a013f00 (``"master-a013f00"``), for VQA files and VizWiz's own
    script for VizWiz files, which accept no other. The older ``"v2.0-a4f1afd"`` (2017, = c4e6a0e),
    ``"beta-07aecec"`` and ``"beta-07aecec-py2"`` (2015) reproduce what those revisions print, for
    comparison with numbers computed by them; see the module docstring for what differs.
    ``allow_missing=True`` scores the answered subset (e.g. validation on the questions whose
    images were extracted; the 07aecec ``loadRes`` allowed this too); unknown ids stay an error.
    Raises ``VQAEvalError`` (a ``ValueError``) with a specific message on any mismatch.
    """
    if revision is not None:
        revision = _vqa_revision(revision)
    loaded_annotations = read_json(annotations, "VQA annotations")
    loaded_results = read_json(results, "VQA results")
    if isinstance(loaded_annotations, list):
        if revision is not None:
            raise VQAEvalError(
                f"revision={revision!r} names a VQA script revision; VizWiz annotations "
                f"are scored with VizWiz's own script (leave revision unset)"
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
        loaded_annotations,
        loaded_questions,
        loaded_results,
        DEFAULT_REVISION if revision is None else revision,
        allow_missing,
    )
