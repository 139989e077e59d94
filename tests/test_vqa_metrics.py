"""Official VQA accuracy on hand-built cases, its error handling, and the caption metrics."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

import pytest

from vqa.data.answer_normalization import (
    CONTRACTIONS,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)
from vqa.metrics import VQAEvalError, evaluate_vqa, question_accuracy
from vqa.metrics.vqa_eval import leave_one_out_accuracies

CASES_DIR = Path(__file__).parent / "data" / "vqa_eval"
CASES: List[Dict[str, Any]] = json.loads((CASES_DIR / "cases.json").read_text(encoding="utf-8"))
VIZWIZ_CASES: List[Dict[str, Any]] = json.loads(
    (CASES_DIR / "vizwiz_cases.json").read_text(encoding="utf-8"))


def _records(answers: List[str]) -> List[Dict[str, Any]]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)]


def _vqa_files(cases: List[Dict[str, Any]]):
    """Annotations, questions and results files (as loaded JSON) for a list of cases."""
    annotations = {"annotations": [], "info": {}, "data_subtype": "val2014"}
    questions = {"questions": [], "task_type": "Open-Ended"}
    results = []
    for k, case in enumerate(cases):
        qid = 1000 + k
        annotations["annotations"].append({
            "question_id": qid, "image_id": k, "question_type": case["question_type"],
            "answer_type": case["answer_type"], "multiple_choice_answer": case["answers"][0],
            "answers": _records(case["answers"])})
        questions["questions"].append({"question_id": qid, "image_id": k, "question": "q?"})
        results.append({"question_id": qid, "answer": case["prediction"]})
    return annotations, questions, results


def _grouped_percent(cases, key, value_key):
    groups: Dict[str, List[float]] = {}
    for case in cases:
        groups.setdefault(case[key], []).append(case[value_key])
    return {name: round(100 * sum(v) / len(v), 2) for name, v in groups.items()}


# --------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("text, expected", [
    ("yes ?", "yes "),               # a mark next to a space is deleted everywhere
    ("left/right", "left right"),    # otherwise replaced by a space
    ("1,000", "1000"),               # digit-comma-digit: all marks deleted
    ("a,b 1,2 (x)", "ab 12 x"),      # ... including the other marks of the text
    ("2.5", "2.5"),                  # period before a digit kept
    ("end.", "end"),
    ("x:y", "x y"),                  # ':' is in the v1.0 punctuation list
    ("don't", "don t"),              # and so is the ASCII apostrophe
    ("don’t", "don’t"),              # the typographic one is not
    ("wow!", "wow!"),                # '!' is not
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_process_punctuation_deletes_at_most_32_periods():
    # The official script passes re.UNICODE (= 32) as re.sub's count.
    assert process_punctuation("." * 40) == "." * 8


def test_process_digit_article():
    assert process_digit_article("The  THREE dogs") == "3 dogs"
    assert process_digit_article("a whats an ten") == "what’s 10"


def test_contraction_table_mixes_apostrophes_as_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don’t"
    assert CONTRACTIONS["cant"] == "can't"
    assert CONTRACTIONS["wheres"] == "where's"
    assert CONTRACTIONS["couldn'tve"] == "couldn’t’ve"


def test_normalize_answer_full_chain():
    assert normalize_answer("\tThe Two dogs.\n") == "2 dogs"


# --------------------------------------------------------------------------- per question
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_hand_built_question_accuracy(case):
    accuracies = leave_one_out_accuracies(case["prediction"], _records(case["answers"]))
    assert sum(accuracies) / len(accuracies) == pytest.approx(case["accuracy"], abs=1e-12)
    assert accuracies[-1] == pytest.approx(case["last_answer_accuracy"], abs=1e-12)
    assert question_accuracy(case["prediction"], _records(case["answers"])) == \
        pytest.approx(case["accuracy"], abs=1e-12)


def test_plain_string_answers_are_distinct_annotators():
    answers = ["yes"] * 8 + ["no"] * 2
    assert question_accuracy("no", answers) == pytest.approx(0.6)


def test_records_equal_as_dicts_are_excluded_together_as_in_the_official_loop():
    # Without answer_id, identical records compare equal: the official "other answers" list then
    # drops all of them at once. Two bare "no" records: for g='no' no other 'no' remains.
    answers = [{"answer": "yes"}] * 8 + [{"answer": "no"}] * 2
    assert question_accuracy("no", answers) == pytest.approx((8 * 2 / 3 + 2 * 0) / 10)


def test_inputs_are_not_modified():
    annotations, questions, results = _vqa_files(CASES[:3])
    before = json.dumps([annotations, results])
    evaluate_vqa(annotations, questions, results)
    assert json.dumps([annotations, results]) == before


# --------------------------------------------------------------------------- whole files
def test_overall_and_per_type_last_answer_quirk(tmp_path):
    annotations, questions, results = _vqa_files(CASES)
    for name, data in [("ann.json", annotations), ("q.json", questions), ("res.json", results)]:
        (tmp_path / name).write_text(json.dumps(data), encoding="utf-8")
    scores = evaluate_vqa(tmp_path / "ann.json", tmp_path / "q.json", str(tmp_path / "res.json"))
    expected_overall = round(100 * sum(c["accuracy"] for c in CASES) / len(CASES), 2)
    assert scores["overall"] == expected_overall
    assert scores["perQuestionType"] == _grouped_percent(CASES, "question_type",
                                                         "last_answer_accuracy")
    assert scores["perAnswerType"] == _grouped_percent(CASES, "answer_type",
                                                       "last_answer_accuracy")
    # The quirk is visible: "yes/no" holds "answering no" (mean 0.6, last 1/3).
    assert scores["perAnswerType"]["yes/no"] != _grouped_percent(
        CASES, "answer_type", "accuracy")["yes/no"]


def test_per_type_mean_rule():
    annotations, questions, results = _vqa_files(CASES)
    scores = evaluate_vqa(annotations, questions, results, per_type="mean")
    assert scores["perAnswerType"] == _grouped_percent(CASES, "answer_type", "accuracy")
    assert scores["perQuestionType"] == _grouped_percent(CASES, "question_type", "accuracy")


def test_overall_rounding_to_two_digits():
    case = next(c for c in CASES if c["name"] == "single matching annotator")  # 0.3
    perfect = CASES[0]  # 1.0
    annotations, questions, results = _vqa_files([case, perfect, perfect])
    assert evaluate_vqa(annotations, questions, results)["overall"] == 76.67  # 230/3


def test_vizwiz_rules():
    annotations = [{"image": f"VizWiz_val_{k:08d}.jpg", "question": "what is it?",
                    "answers": [{"answer": a, "answer_confidence": "yes"} for a in case["answers"]],
                    "answer_type": case["answer_type"], "answerable": 1}
                   for k, case in enumerate(VIZWIZ_CASES)]
    results = [{"image": f"VizWiz_val_{k:08d}.jpg", "answer": case["prediction"]}
               for k, case in enumerate(VIZWIZ_CASES)]
    scores = evaluate_vqa(annotations, None, list(reversed(results)))
    assert scores["overall"] == round(
        100 * sum(c["accuracy"] for c in VIZWIZ_CASES) / len(VIZWIZ_CASES), 2)
    assert scores["perAnswerType"] == _grouped_percent(VIZWIZ_CASES, "answer_type", "accuracy")
    assert scores["perQuestionType"] == {}


# --------------------------------------------------------------------------- errors
def _three():
    return _vqa_files(CASES[:3])


def test_missing_prediction_is_a_clear_error():
    annotations, questions, results = _three()
    with pytest.raises(VQAEvalError, match=r"1 annotated question_id\(s\) have no prediction"):
        evaluate_vqa(annotations, questions, results[:2])


def test_unknown_question_id_is_a_clear_error():
    annotations, questions, results = _three()
    results.append({"question_id": 424242, "answer": "yes"})
    with pytest.raises(VQAEvalError, match=r"not in the annotations \(424242\)"):
        evaluate_vqa(annotations, questions, results)


def test_duplicate_prediction_is_an_error():
    annotations, questions, results = _three()
    results.append(dict(results[0]))
    with pytest.raises(VQAEvalError, match="more than once"):
        evaluate_vqa(annotations, questions, results)


@pytest.mark.parametrize("bad, message", [
    ({"question_id": 1000}, "lacks the key"),
    ({"question_id": 1000, "answer": 3}, "'answer' must be a string"),
])
def test_malformed_result_entry(bad, message):
    annotations, questions, results = _three()
    results[0] = bad
    with pytest.raises(ValueError, match=message):
        evaluate_vqa(annotations, questions, results)


def test_results_must_be_a_list():
    annotations, questions, _ = _three()
    with pytest.raises(VQAEvalError, match="results must be a JSON list"):
        evaluate_vqa(annotations, questions, {"question_id": 1000, "answer": "yes"})


def test_questions_from_another_split_are_rejected():
    annotations, questions, results = _three()
    questions["questions"] = questions["questions"][1:]
    with pytest.raises(VQAEvalError, match="questions file does not match"):
        evaluate_vqa(annotations, questions, results)


def test_multiple_choice_answers_must_be_choices():
    annotations, questions, results = _three()
    questions["task_type"] = "Multiple Choice"
    for q in questions["questions"]:
        q["multiple_choices"] = ["yes", "no"]
    results[2]["answer"] = "left/right"
    with pytest.raises(VQAEvalError, match="not one of its multiple choices"):
        evaluate_vqa(annotations, questions, results)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="VQA annotations file not found"):
        evaluate_vqa(tmp_path / "nope.json", None, [])
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        evaluate_vqa(tmp_path / "broken.json", None, [])


def test_empty_annotations_and_bad_per_type():
    with pytest.raises(VQAEvalError, match="nothing to evaluate"):
        evaluate_vqa({"annotations": []}, None, [])
    annotations, questions, results = _three()
    with pytest.raises(ValueError, match="per_type"):
        evaluate_vqa(annotations, questions, results, per_type="first")


# --------------------------------------------------------------------------- captions
_CAPTION_REFS = {
    1: ["A dog runs across the green grass.", "a brown dog running on a lawn",
        "The dog is running in a park."],
    2: ["A red car parked on a city street.", "a small red car next to the curb",
        "Red car parked by the road."],
    3: ["Two people ride bicycles down a hill.", "two cyclists riding downhill",
        "People on bikes going down a road."],
}


def _caption_annotations():
    return {"images": [{"id": i} for i in _CAPTION_REFS],
            "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                            for i, caps in _CAPTION_REFS.items() for k, c in enumerate(caps)]}


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")


@needs_java
def test_caption_metrics_rank_matching_captions_above_a_constant_one():
    pytest.importorskip("pycocoevalcap")
    from vqa.metrics import evaluate_captions

    exact = [{"image_id": i, "caption": caps[0]} for i, caps in _CAPTION_REFS.items()]
    constant = [{"image_id": i, "caption": "a picture of something"} for i in _CAPTION_REFS]
    good = evaluate_captions(_caption_annotations(), exact, use_spice=False)
    bad = evaluate_captions(_caption_annotations(), constant, use_spice=False)
    assert set(good) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    # A caption equal to one of the references: clipped n-gram precision 1 and no brevity
    # penalty (the closest reference has its length) -> BLEU-n = 1; the best LCS match is the
    # whole caption -> ROUGE-L = 1.
    for n in range(1, 5):
        assert good[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert good["ROUGE_L"] == pytest.approx(1.0)
    for key in good:
        assert good[key] > bad[key], key


def test_caption_results_errors_come_before_any_java():
    from vqa.metrics.caption_eval import CaptionEvalError, evaluate_captions

    with pytest.raises(CaptionEvalError, match="no reference captions"):
        evaluate_captions(_caption_annotations(), [{"image_id": 99, "caption": "x"}])
    with pytest.raises(CaptionEvalError, match="more than one caption"):
        evaluate_captions(_caption_annotations(), [{"image_id": 1, "caption": "x"},
                                                   {"image_id": 1, "caption": "y"}])
    with pytest.raises(CaptionEvalError, match="non-empty JSON list"):
        evaluate_captions(_caption_annotations(), [])
    with pytest.raises(ValueError, match="lacks the key"):
        evaluate_captions(_caption_annotations(), [{"image_id": 1}])


def test_spice_is_skipped_or_refused_without_its_models():
    pytest.importorskip("pycocoevalcap")
    from vqa.metrics.caption_eval import CaptionEvalError, evaluate_captions, spice_available

    reason = spice_available()
    if reason is None:
        pytest.skip("SPICE models are installed here")
    assert "not" in reason  # "java is not on PATH" or "... are not installed ..."
    with pytest.raises(CaptionEvalError, match="SPICE was requested but cannot run"):
        evaluate_captions(_caption_annotations(), [{"image_id": 1, "caption": "a dog"}],
                          use_spice=True)


@pytest.mark.parametrize("statement", ["import vqa.metrics", "import vqa.data.answer_vocab",
                                       "from vqa.data import VQADataset"])
def test_modules_import_on_their_own(statement):
    # vqa.metrics and vqa.data import each other's modules; a fresh interpreter catches cycles.
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", statement], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_allow_missing_scores_the_answered_subset():
    annotations, questions, results = _three()
    scores = evaluate_vqa(annotations, questions, results[1:], allow_missing=True)
    assert scores["overall"] == round(100 * sum(c["accuracy"] for c in CASES[1:3]) / 2, 2)
    with pytest.raises(VQAEvalError, match="not in the annotations"):
        evaluate_vqa(annotations, questions, results + [{"question_id": 5, "answer": "x"}],
                     allow_missing=True)
    with pytest.raises(VQAEvalError, match="results are empty"):
        evaluate_vqa(annotations, questions, [], allow_missing=True)
