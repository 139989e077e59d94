"""VQA heads trained on stores the extraction pipeline wrote (make-synthetic -> extract -> train).

The heads' own tests feed them structured or random stores; here the rows come from the detector
(seeded random initialisation: no weights ship) through ``gridfeats.extract``, so this catches a
break anywhere on the path a user takes: store ids vs question image ids, row layout, grid sizes,
feature scale. At the cheap size the margin over the majority answer comes mostly from the
question prior (what a blind model learns); the slow variant trains long enough on 600 images for
the image to matter, and must then also beat the best answer per question string.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch

from vqa.examples.heads_demo import extract_stores, run_vqa, vqa_majority_baseline
from vqa.examples.synthetic_features import make_feature_dataset
from vqa.metrics import evaluate_vqa


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def question_prior_accuracy(paths) -> float:
    """Accuracy of answering each held-out question with its most frequent training answer."""

    def load(split):
        questions = json.loads(paths[f"{split}_questions"].read_text())["questions"]
        answers = {
            a["question_id"]: a["multiple_choice_answer"]
            for a in json.loads(paths[f"{split}_annotations"].read_text())["annotations"]
        }
        return questions, answers

    train_questions, train_answers = load("train")
    by_text = collections.defaultdict(collections.Counter)
    for q in train_questions:
        by_text[q["question"]][train_answers[q["question_id"]]] += 1
    overall = collections.Counter(train_answers.values()).most_common(1)[0][0]
    results = [
        {
            "question_id": q["question_id"],
            "answer": (
                by_text[q["question"]].most_common(1)[0][0] if q["question"] in by_text else overall
            ),
        }
        for q in json.loads(paths["val_questions"].read_text())["questions"]
    ]
    return evaluate_vqa(paths["val_annotations"], paths["val_questions"], results)["overall"]


def train_on_extracted_grid(tmp_path, images: int, size, epoch_scale: float):
    paths = make_feature_dataset(tmp_path / "data", images, seed=0, modes=())
    paths.update(extract_stores(paths, tmp_path / "data", *size, modes=("grid",), threads=1))
    row = run_vqa(paths, "pythia", "grid", tmp_path / "runs", epoch_scale)
    return paths, row


def test_pythia_learns_from_extracted_grid_features(tmp_path, one_thread):
    paths, row = train_on_extracted_grid(tmp_path, 60, (96, 128), epoch_scale=1.0)
    majority = vqa_majority_baseline(paths)["accuracy"]
    assert row["accuracy"] >= majority + 8.0, (row, majority)


@pytest.mark.slow
def test_pythia_uses_the_image_in_extracted_grid_features(tmp_path, one_thread):
    paths, row = train_on_extracted_grid(tmp_path, 600, (224, 320), epoch_scale=1.0)
    majority = vqa_majority_baseline(paths)["accuracy"]
    assert row["accuracy"] >= majority + 20.0, (row, majority)
    assert row["accuracy"] >= question_prior_accuracy(paths) + 3.0
