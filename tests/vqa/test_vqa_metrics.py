"""Official VQA accuracy: the official script's own output on the shared stress set (every
revision, to the digit), hand-built cases per revision, error handling, and the caption metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import pytest

from vqa.data.answer_normalization import (
    BETA_07AECEC,
    BETA_07AECEC_PY2,
    CONTRACTIONS_07AECEC,
    CONTRACTIONS_2017,
    DEFAULT_REVISION,
    MASTER_A013F00,
    REVISIONS,
    V2_A4F1AFD,
    VIZWIZ,
    Python2TextError,
    answer_rules,
    normalize_answer,
    official_prediction,
    process_digit_article,
    process_punctuation,
)
from vqa.metrics import VQAEvalError, evaluate_vqa, question_accuracy
from vqa.metrics.vqa_eval import leave_one_out_accuracies, round_half_away_from_zero

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = REPO / "tests" / "assets" / "vqa_eval"
CASES: List[Dict[str, Any]] = json.loads((CASES_DIR / "cases.json").read_text(encoding="utf-8"))
VIZWIZ_CASES: List[Dict[str, Any]] = json.loads(
    (CASES_DIR / "vizwiz_cases.json").read_text(encoding="utf-8")
)
EVERY_REVISION = pytest.mark.parametrize("revision", REVISIONS)
#: The revisions whose per-type tables average question means (07aecec: the last annotator).
MEAN_PER_TYPE = (MASTER_A013F00, V2_A4F1AFD)
#: The 150-question stress set with the official script's own output at three revisions (run
#: under Python 3); it lives next to the repository, ``GRIDFEATS_VQAEVAL`` may point elsewhere.
FIXTURE = Path(os.environ.get("GRIDFEATS_VQAEVAL", REPO.parent / "shared/fixtures/vqaeval"))
FIXTURE_EXPECTED = {
    MASTER_A013F00: "expected_a013f00.json",
    V2_A4F1AFD: "expected_a4f1afd.json",
    BETA_07AECEC: "expected_07aecec.json",
}


def _records(answers: List[str]) -> List[Dict[str, Any]]:
    return [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
    ]


def _vqa_files(cases: List[Dict[str, Any]]):
    """Annotations, questions and results files (as loaded JSON) for a list of cases."""
    annotations = {"annotations": [], "info": {}, "data_subtype": "val2014"}
    questions = {"questions": [], "task_type": "Open-Ended"}
    results = []
    for k, case in enumerate(cases):
        qid = 1000 + k
        annotations["annotations"].append(
            {
                "question_id": qid,
                "image_id": k,
                "question_type": case["question_type"],
                "answer_type": case["answer_type"],
                "multiple_choice_answer": case["answers"][0],
                "answers": _records(case["answers"]),
            }
        )
        questions["questions"].append({"question_id": qid, "image_id": k, "question": "q?"})
        results.append({"question_id": qid, "answer": case["prediction"]})
    return annotations, questions, results


def _grouped_percent(cases, key, values):
    groups: Dict[str, List[float]] = {}
    for case, value in zip(cases, values):
        groups.setdefault(case[key], []).append(value)
    return {name: round(100 * sum(v) / len(v), 2) for name, v in groups.items()}


def _expected(cases, field, revision):
    return [case[field][revision] for case in cases]


def _case(name: str) -> Dict[str, Any]:
    return next(c for c in CASES if c["name"] == name)


# --------------------------------------------------------------------------- the official output
def _fixture_paths() -> List[str]:
    if not (FIXTURE / "annotations.json").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the official VQA eval fixture is missing at {FIXTURE}")
        pytest.skip(
            f"official VQA eval fixture not found at {FIXTURE} (../shared/fixtures/vqaeval)"
        )
    return [str(FIXTURE / name) for name in ("annotations.json", "questions.json", "results.json")]


def _figures(metrics: Dict[str, Any]) -> Dict[str, str]:
    """Every number as the script prints it (2 decimals), keyed by table and name."""
    figures = {"overall": f"{metrics['overall']:.2f}"}
    for table in ("perAnswerType", "perQuestionType"):
        figures.update({f"{table}/{k}": f"{v:.2f}" for k, v in metrics[table].items()})
    return figures


@pytest.mark.parametrize("revision", list(FIXTURE_EXPECTED))
def test_official_fixture_every_figure_to_the_digit(revision):
    annotations, questions, results = _fixture_paths()
    expected = json.loads((FIXTURE / FIXTURE_EXPECTED[revision]).read_text(encoding="utf-8"))
    got = evaluate_vqa(annotations, questions, results, revision=revision)
    assert len(_figures(expected)) == 14  # overall, 3 answer types, 10 question types
    assert _figures(got) == _figures(expected)
    assert got == expected  # the unrounded floats too: the script's own round()


def test_official_fixture_default_is_master_and_the_revisions_differ():
    annotations, questions, results = _fixture_paths()
    master = json.loads((FIXTURE / FIXTURE_EXPECTED[MASTER_A013F00]).read_text(encoding="utf-8"))
    assert evaluate_vqa(annotations, questions, results) == master
    overall = {
        r: evaluate_vqa(annotations, questions, results, r)["overall"] for r in FIXTURE_EXPECTED
    }
    assert len(set(overall.values())) == 3, overall
    # The Python 2 beta stops on this set (a contraction byte string joined with unicode words).
    with pytest.raises(VQAEvalError, match="UnicodeDecodeError"):
        evaluate_vqa(annotations, questions, results, revision=BETA_07AECEC_PY2)


def test_official_fixture_cli_prints_the_master_figures(capsys):
    from gridfeats.cli import main as gridfeats_main

    annotations, questions, results = _fixture_paths()
    master = json.loads((FIXTURE / FIXTURE_EXPECTED[MASTER_A013F00]).read_text(encoding="utf-8"))
    args = ["vqa", "eval", "--annotations", annotations, "--questions", questions]
    assert gridfeats_main(args + ["--results", results]) == 0
    printed = capsys.readouterr().out
    overall = re.search(r"^Overall Accuracy is: (\S+)$", printed, re.M).group(1)
    rows = dict(re.findall(r"^(.+) : (\d+\.\d\d)$", printed, re.M))
    want = _figures(master)
    assert overall == want.pop("overall")
    assert rows == {key.split("/", 1)[1]: value for key, value in want.items()}

    # The deprecated flag still works, says what it names, and picks that revision.
    v2 = json.loads((FIXTURE / FIXTURE_EXPECTED[V2_A4F1AFD]).read_text(encoding="utf-8"))
    assert gridfeats_main(args + ["--results", results, "--official", "vqa-py3"]) == 0
    out, err = capsys.readouterr()
    assert f"Overall Accuracy is: {v2['overall']:.2f}" in out
    assert "--official vqa-py3 is deprecated; it names --revision v2.0-a4f1afd" in err
    assert gridfeats_main(args + ["--results", results, "--revision", BETA_07AECEC]) == 0
    assert "Overall Accuracy is: 60.87" in capsys.readouterr().out
    contradiction = ["--revision", MASTER_A013F00, "--official", "vqa-py3"]
    assert gridfeats_main(args + ["--results", results] + contradiction) == 2
    assert "contradicts --revision master-a013f00" in capsys.readouterr().err


# --------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    "text, rules2017, beta",
    [
        ("yes ?", "yes ", "yes "),  # a mark next to a space is deleted everywhere
        ("left/right", "left right", "left right"),  # otherwise replaced by a space
        ("1,000", "1000", "1000"),  # digit-comma-digit: all marks deleted
        ("a,b 1,2 (x)", "ab 12 x", "ab 12 x"),  # ... including the other marks of the text
        ("2.5", "2.5", "2.5"),  # period before a digit kept
        ("end.", "end", "end"),
        ("x:y", "x:y", "x y"),  # ':' only in the 07aecec list
        ("don't", "don't", "don t"),  # and so is the ASCII apostrophe
        ("don’t", "don’t", "don’t"),  # the typographic one is in neither
        ("x-ray", "x ray", "x-ray"),  # '-' only in the 2017 list
        ("wow!", "wow ", "wow!"),  # '!' too
        ("wow !", "wow ", "wow !"),  # spaced: deleted
        ("{a}", " a ", "{a}"),  # '{' '}' too
    ],
)
def test_process_punctuation_per_revision(text, rules2017, beta):
    for revision in (MASTER_A013F00, V2_A4F1AFD):  # master kept the 2017 list
        assert process_punctuation(text, revision) == rules2017
    for revision in (BETA_07AECEC, BETA_07AECEC_PY2):
        assert process_punctuation(text, revision) == beta
    assert process_punctuation(text) == rules2017  # the default is master


def test_python2_digits_are_ascii_only():
    # Python 3's \d matches any Unicode digit, Python 2's (no re.UNICODE flag) only 0-9.
    arabic = "\u0661,\u0662"  # ARABIC-INDIC ONE, comma, TWO
    assert process_punctuation(arabic, MASTER_A013F00) == "\u0661\u0662"  # digit-comma-digit
    assert process_punctuation(arabic, BETA_07AECEC) == "\u0661\u0662"
    assert process_punctuation(arabic, BETA_07AECEC_PY2) == "\u0661 \u0662"  # a glued comma
    assert process_punctuation("a.\u0661", MASTER_A013F00) == "a.\u0661"  # a digit follows: kept
    assert process_punctuation("a.\u0661", BETA_07AECEC_PY2) == "a\u0661"


@EVERY_REVISION
def test_process_punctuation_deletes_at_most_32_periods(revision):
    # The official script passes re.UNICODE (= 32) as re.sub's count.
    assert process_punctuation("." * 40, revision) == "." * 8


@pytest.mark.parametrize(
    "text, revision, expected",
    [
        ("The  THREE dogs", MASTER_A013F00, "3 dogs"),
        ("The  THREE dogs", BETA_07AECEC_PY2, "3 dogs"),
        ("a whats an ten", MASTER_A013F00, "what's 10"),
        ("a whats an ten", V2_A4F1AFD, "what's 10"),
        ("a whats an ten", BETA_07AECEC, "what’s 10"),
        ("a whats an ten", BETA_07AECEC_PY2, "what’s 10"),
        ("couldnt've", MASTER_A013F00, "couldn't've"),
        # Python 2: a key holding ’ is a byte string that never equals a unicode word.
        ("couldnt’ve", BETA_07AECEC_PY2, "couldnt’ve"),
        ("couldnt’ve", BETA_07AECEC, "couldn’t’ve"),  # the same table on Python 3 does apply
        ("couldnt’ve", VIZWIZ, "couldn’t’ve"),
    ],
)
def test_process_digit_article(text, revision, expected):
    assert process_digit_article(text, revision) == expected


def test_contraction_tables_differ_only_in_apostrophes():
    assert len(CONTRACTIONS_2017) == len(CONTRACTIONS_07AECEC) == 120
    assert [k.replace("’", "'") for k in CONTRACTIONS_07AECEC] == list(CONTRACTIONS_2017)
    assert all(k.isascii() and v.isascii() for k, v in CONTRACTIONS_2017.items())
    assert CONTRACTIONS_2017["dont"] == "don't"
    assert CONTRACTIONS_2017["somebody'd"] == "somebodyd"  # the official quirk, kept
    # 07aecec mixes the two apostrophes.
    assert CONTRACTIONS_07AECEC["dont"] == "don’t"
    assert CONTRACTIONS_07AECEC["cant"] == "can't"
    assert CONTRACTIONS_07AECEC["wheres"] == "where's"
    assert CONTRACTIONS_07AECEC["couldn'tve"] == "couldn’t’ve"
    assert sum(not v.isascii() for v in CONTRACTIONS_07AECEC.values()) == 111
    assert sum(not k.isascii() for k in CONTRACTIONS_07AECEC) == 43
    # master a013f00 changed no table: its text rules are the 2017 ones.
    assert answer_rules(MASTER_A013F00).contractions is CONTRACTIONS_2017
    assert answer_rules(MASTER_A013F00).punctuation == answer_rules(V2_A4F1AFD).punctuation


@EVERY_REVISION
def test_normalize_answer_full_chain(revision):
    assert normalize_answer("\tThe Two dogs.\n", revision) == "2 dogs"


def test_normalize_answer_default_is_master():
    assert DEFAULT_REVISION == MASTER_A013F00 == REVISIONS[0]
    assert normalize_answer("I dont know!") == "i don't know"
    assert normalize_answer("I dont know!", BETA_07AECEC) == "i don’t know!"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dont", None),  # a lone byte string 'don’t': equals no unicode answer
        ("the two dont", None),  # every word from a table ('2' is a byte string too): still bytes
        ("cant", "can't"),  # an ASCII replacement compares equal to unicode
        ("two", "2"),
        ("don’t", "don’t"),  # typed typographic: stays unicode
    ],
)
def test_python2_byte_strings(text, expected):
    assert official_prediction(text, BETA_07AECEC_PY2) == expected
    assert official_prediction(text, BETA_07AECEC) == normalize_answer(text, BETA_07AECEC)


@pytest.mark.parametrize("text", ["i dont know", "whats up", "2 dont"])
def test_python2_unicode_join_failure(text):
    # ' '.join of a unicode word and a non-ASCII byte string raises UnicodeDecodeError there.
    with pytest.raises(Python2TextError, match="UnicodeDecodeError"):
        official_prediction(text, BETA_07AECEC_PY2)
    assert official_prediction(text, BETA_07AECEC) == normalize_answer(text, BETA_07AECEC)


def test_unknown_rules_name():
    assert answer_rules(DEFAULT_REVISION).name == MASTER_A013F00
    with pytest.raises(ValueError, match="unknown VQA script revision 'vqa-py4'"):
        normalize_answer("yes", "vqa-py4")


@pytest.mark.parametrize(
    "old, new", [("vqa-py3", V2_A4F1AFD), ("vqa-py2-07aecec", BETA_07AECEC_PY2)]
)
def test_deprecated_names_warn_and_mean_what_they_always_meant(old, new):
    annotations, questions, results = _vqa_files(CASES)
    with pytest.warns(DeprecationWarning, match=f"{old!r} is deprecated; it names {new!r}"):
        scores = evaluate_vqa(annotations, questions, results, revision=old)
    assert scores == evaluate_vqa(annotations, questions, results, revision=new)
    assert scores != evaluate_vqa(annotations, questions, results)


def test_python2_round_is_half_away_from_zero():
    assert round_half_away_from_zero(12.125, 2) == 12.13  # exact tie (12.125 = 97/8)
    assert round(12.125, 2) == 12.12  # Python 3: to even
    assert round_half_away_from_zero(2.675, 2) == 2.67  # stored below the tie on both
    assert round_half_away_from_zero(0.5, 0) == 1.0


# --------------------------------------------------------------------------- per question
@EVERY_REVISION
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_hand_built_question_accuracy(case, revision):
    accuracies = leave_one_out_accuracies(case["prediction"], _records(case["answers"]), revision)
    assert sum(accuracies) / len(accuracies) == pytest.approx(case["accuracy"][revision], abs=1e-12)
    assert accuracies[-1] == pytest.approx(case["last_answer_accuracy"][revision], abs=1e-12)
    assert question_accuracy(
        case["prediction"], _records(case["answers"]), revision
    ) == pytest.approx(case["accuracy"][revision], abs=1e-12)


@pytest.mark.parametrize(
    "first, second",
    [
        (MASTER_A013F00, V2_A4F1AFD),
        (V2_A4F1AFD, BETA_07AECEC),
        (BETA_07AECEC, BETA_07AECEC_PY2),
    ],
)
def test_cases_tell_the_revisions_apart(first, second):
    differing = [c["name"] for c in CASES if c["accuracy"][first] != c["accuracy"][second]]
    assert differing, "no hand-built case separates the two revisions"


def test_master_rules_one_by_one():
    # 1. ground truth stripped before the identity test: "yes\n" and "yes" are identical, so the
    #    prediction is compared raw ("Yes" matches none); the 2017 script processed it -> 1.
    answers = _records(["yes\n", "yes\n"] + ["yes"] * 8)
    assert question_accuracy("Yes", answers) == 0.0
    assert question_accuracy("yes", answers) == 1.0
    assert question_accuracy("Yes", answers, V2_A4F1AFD) == 1.0
    # 2. disagreeing ground truth gets processDigitArticle too (2017: punctuation only).
    answers = _records(["2", "2"] + ["two"] * 8)
    assert question_accuracy("2", answers) == 1.0
    assert question_accuracy("2", answers, V2_A4F1AFD) == pytest.approx(0.6)
    # 3. identical ground truth: the prediction is only stripped (2017: always processed).
    answers = _records(["two"] * 10)
    assert question_accuracy(" two\n", answers) == 1.0
    assert question_accuracy("Two", answers) == 0.0
    assert question_accuracy("two", answers, V2_A4F1AFD) == 0.0


def test_question_accuracy_default_is_master():
    for case in CASES:
        assert question_accuracy(case["prediction"], _records(case["answers"])) == pytest.approx(
            case["accuracy"][MASTER_A013F00], abs=1e-12
        )


def test_plain_string_answers_are_distinct_annotators():
    answers = ["yes"] * 8 + ["no"] * 2
    assert question_accuracy("no", answers) == pytest.approx(0.6)


def test_records_equal_as_dicts_are_excluded_together_as_in_the_official_loop():
    # Without answer_id, identical records compare equal: the official "other answers" list then
    # drops all of them at once. Two bare "no" records: for g='no' no other 'no' remains.
    answers = [{"answer": "yes"}] * 8 + [{"answer": "no"}] * 2
    assert question_accuracy("no", answers) == pytest.approx((8 * 2 / 3 + 2 * 0) / 10)


@EVERY_REVISION
def test_inputs_are_not_modified(revision):
    annotations, questions, results = _vqa_files(CASES[:3] + CASES[-3:])
    before = json.dumps([annotations, results])
    evaluate_vqa(annotations, questions, results, revision=revision)
    assert json.dumps([annotations, results]) == before


def test_training_targets_follow_the_metric_default():
    from vqa.data.answer_vocab import answer_scores

    # '-' is punctuation (2017 list, kept by master), so "x-ray" and "x ray" are one answer.
    assert answer_scores(["x-ray"] * 8 + ["x ray"] * 2) == {"x ray": pytest.approx(1.0)}
    # master drops articles from disagreeing ground truth too: ten "dog" (2017 would give 0.6).
    assert answer_scores(["dog"] * 2 + ["the dog"] * 8) == {"dog": pytest.approx(1.0)}


# --------------------------------------------------------------------------- whole files
@pytest.mark.parametrize("revision", MEAN_PER_TYPE)
def test_overall_and_per_type_average_question_means(tmp_path, revision):
    annotations, questions, results = _vqa_files(CASES)
    for name, data in [("ann.json", annotations), ("q.json", questions), ("res.json", results)]:
        (tmp_path / name).write_text(json.dumps(data), encoding="utf-8")
    scores = evaluate_vqa(
        tmp_path / "ann.json", tmp_path / "q.json", str(tmp_path / "res.json"), revision=revision
    )
    accuracy = _expected(CASES, "accuracy", revision)
    assert scores["overall"] == round(100 * sum(accuracy) / len(CASES), 2)
    assert scores["perQuestionType"] == _grouped_percent(CASES, "question_type", accuracy)
    assert scores["perAnswerType"] == _grouped_percent(CASES, "answer_type", accuracy)


def test_default_scores_are_master():
    annotations, questions, results = _vqa_files(CASES)
    master = evaluate_vqa(annotations, questions, results, revision=MASTER_A013F00)
    assert evaluate_vqa(annotations, questions, results) == master
    assert master != evaluate_vqa(annotations, questions, results, revision=V2_A4F1AFD)


@pytest.mark.parametrize("revision", [BETA_07AECEC, BETA_07AECEC_PY2])
def test_overall_and_per_type_07aecec_last_answer_quirk(revision):
    cases = [c for c in CASES if c["prediction"] not in ("dont", "i dont know")]  # py2 stops
    annotations, questions, results = _vqa_files(cases)
    scores = evaluate_vqa(annotations, questions, results, revision=revision)
    accuracy = _expected(cases, "accuracy", revision)
    last = _expected(cases, "last_answer_accuracy", revision)
    assert scores["overall"] == round(100 * sum(accuracy) / len(cases), 2)
    assert scores["perQuestionType"] == _grouped_percent(cases, "question_type", last)
    assert scores["perAnswerType"] == _grouped_percent(cases, "answer_type", last)
    # The quirk is visible: "yes/no" holds "answering no" (mean 0.6, last 1/3).
    assert (
        scores["perAnswerType"]["yes/no"]
        != _grouped_percent(cases, "answer_type", accuracy)["yes/no"]
    )


def test_per_type_last_answer_vs_mean_on_one_question():
    annotations, questions, results = _vqa_files([_case("eight yes two no, answering no")])
    for revision in MEAN_PER_TYPE:
        assert evaluate_vqa(annotations, questions, results, revision=revision) == {
            "overall": 60.0,
            "perQuestionType": {"is the": 60.0},
            "perAnswerType": {"yes/no": 60.0},
        }
    for revision in (BETA_07AECEC, BETA_07AECEC_PY2):
        assert evaluate_vqa(annotations, questions, results, revision=revision) == {
            "overall": 60.0,
            "perQuestionType": {"is the": 33.33},
            "perAnswerType": {"yes/no": 33.33},
        }


@EVERY_REVISION
def test_overall_rounding_to_two_digits(revision):
    case = _case("single matching annotator")  # 0.3 in every revision
    perfect = _case("eight yes two no, answering yes")  # 1.0 in every revision
    annotations, questions, results = _vqa_files([case, perfect, perfect])
    assert evaluate_vqa(annotations, questions, results, revision=revision)["overall"] == 76.67


@pytest.mark.parametrize(
    "revision, rounded",
    [
        (MASTER_A013F00, 12.12),
        (V2_A4F1AFD, 12.12),
        (BETA_07AECEC, 12.12),
        (BETA_07AECEC_PY2, 12.13),
    ],
)
def test_exact_tie_rounds_as_each_python_does(revision, rounded):
    # 97 of 800 questions right: 100 * 97 / 800 = 12.125 exactly, in overall and per type alike.
    right = {
        "prediction": "yes",
        "answers": ["yes"] * 10,
        "question_type": "is the",
        "answer_type": "yes/no",
    }
    wrong = dict(right, prediction="no")
    annotations, questions, results = _vqa_files([right] * 97 + [wrong] * 703)
    scores = evaluate_vqa(annotations, questions, results, revision=revision)
    assert scores["overall"] == scores["perAnswerType"]["yes/no"] == rounded
    assert scores["perQuestionType"]["is the"] == rounded


def test_question_order_follows_each_script():
    # master and a4f1afd walk the annotation file, 07aecec the results file: see the type order.
    cases = [dict(CASES[0], question_type=name) for name in ("first", "second", "third")]
    annotations, questions, results = _vqa_files(cases)
    results.reverse()
    for revision in MEAN_PER_TYPE:
        scores = evaluate_vqa(annotations, questions, results, revision=revision)
        assert list(scores["perQuestionType"]) == ["first", "second", "third"]
    for revision in (BETA_07AECEC, BETA_07AECEC_PY2):
        scores = evaluate_vqa(annotations, questions, results, revision=revision)
        assert list(scores["perQuestionType"]) == ["third", "second", "first"]


def test_07aecec_python2_failure_is_a_clear_error():
    case = dict(CASES[0], prediction="i dont know", answers=["i don't know"] * 10)
    annotations, questions, results = _vqa_files([case])
    assert evaluate_vqa(annotations, questions, results)["overall"] == 0.0  # raw, not processed
    assert evaluate_vqa(annotations, questions, results, revision=V2_A4F1AFD)["overall"] == 100.0
    # Python 3 runs 07aecec to the end: "don’t" (U+2019) is not the answers' "don't".
    assert evaluate_vqa(annotations, questions, results, revision=BETA_07AECEC)["overall"] == 0.0
    with pytest.raises(
        VQAEvalError, match=r"question_id 1000: .*UnicodeDecodeError.*beta-07aecec'"
    ):
        evaluate_vqa(annotations, questions, results, revision=BETA_07AECEC_PY2)


def _vizwiz_files():
    annotations = [
        {
            "image": f"VizWiz_val_{k:08d}.jpg",
            "question": "what is it?",
            "answers": [{"answer": a, "answer_confidence": "yes"} for a in case["answers"]],
            "answer_type": case["answer_type"],
            "answerable": 1,
        }
        for k, case in enumerate(VIZWIZ_CASES)
    ]
    results = [
        {"image": f"VizWiz_val_{k:08d}.jpg", "answer": case["prediction"]}
        for k, case in enumerate(VIZWIZ_CASES)
    ]
    return annotations, results


def test_vizwiz_rules():
    annotations, results = _vizwiz_files()
    scores = evaluate_vqa(annotations, None, list(reversed(results)))
    accuracy = [c["accuracy"] for c in VIZWIZ_CASES]
    assert scores["overall"] == round(100 * sum(accuracy) / len(VIZWIZ_CASES), 2)
    assert scores["perAnswerType"] == _grouped_percent(VIZWIZ_CASES, "answer_type", accuracy)
    assert scores["perQuestionType"] == {}


@pytest.mark.parametrize("revision", [MASTER_A013F00, BETA_07AECEC_PY2])
def test_vizwiz_refuses_a_vqa_script_revision(revision):
    annotations, results = _vizwiz_files()
    with pytest.raises(VQAEvalError, match="VizWiz annotations are scored with VizWiz's own"):
        evaluate_vqa(annotations, None, results, revision=revision)


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


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"question_id": 1000}, "lacks the key"),
        ({"question_id": 1000, "answer": 3}, "'answer' must be a string"),
    ],
)
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


def test_empty_annotations_and_bad_revision_name():
    with pytest.raises(VQAEvalError, match="nothing to evaluate"):
        evaluate_vqa({"annotations": []}, None, [])
    annotations, questions, results = _three()
    with pytest.raises(ValueError, match="unknown VQA script revision 'v1'.*'master-a013f00'"):
        evaluate_vqa(annotations, questions, results, revision="v1")
    with pytest.raises(ValueError, match="unknown VQA script revision 'vizwiz'"):
        question_accuracy("yes", ["yes"] * 10, revision=VIZWIZ)


# --------------------------------------------------------------------------- captions
_CAPTION_REFS = {
    1: [
        "A dog runs across the green grass.",
        "a brown dog running on a lawn",
        "The dog is running in a park.",
    ],
    2: [
        "A red car parked on a city street.",
        "a small red car next to the curb",
        "Red car parked by the road.",
    ],
    3: [
        "Two people ride bicycles down a hill.",
        "two cyclists riding downhill",
        "People on bikes going down a road.",
    ],
}


def _caption_annotations():
    return {
        "images": [{"id": i} for i in _CAPTION_REFS],
        "annotations": [
            {"image_id": i, "id": 10 * i + k, "caption": c}
            for i, caps in _CAPTION_REFS.items()
            for k, c in enumerate(caps)
        ],
    }


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
        evaluate_captions(
            _caption_annotations(),
            [{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}],
        )
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
        evaluate_captions(
            _caption_annotations(), [{"image_id": 1, "caption": "a dog"}], use_spice=True
        )


@pytest.mark.parametrize(
    "statement",
    ["import vqa.metrics", "import vqa.data.answer_vocab", "from vqa.data import VQADataset"],
)
def test_modules_import_on_their_own(statement):
    # vqa.metrics and vqa.data import each other's modules; a fresh interpreter catches cycles.
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", statement], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_allow_missing_scores_the_answered_subset():
    annotations, questions, results = _three()
    scores = evaluate_vqa(annotations, questions, results[1:], allow_missing=True)
    answered = [c["accuracy"][DEFAULT_REVISION] for c in CASES[1:3]]
    assert scores["overall"] == round(100 * sum(answered) / 2, 2)
    with pytest.raises(VQAEvalError, match="not in the annotations"):
        evaluate_vqa(
            annotations,
            questions,
            results + [{"question_id": 5, "answer": "x"}],
            allow_missing=True,
        )
    with pytest.raises(VQAEvalError, match="results are empty"):
        evaluate_vqa(annotations, questions, [], allow_missing=True)
