"""CIDEr-D used as the SCST reward: equal to the COCO toolkit's scorer, and its CIDEr-D traits."""

from __future__ import annotations

import random

import pytest

from vqa.engine.cider_reward import CiderD


def _corpus(seed=0, images=25):
    rng = random.Random(seed)
    words = list(range(3, 20))
    references = {
        i: [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(5)]
        for i in range(images)
    }
    candidates = {i: [rng.choice(words) for _ in range(rng.randint(2, 10))] for i in references}
    candidates[3] = list(references[3][0])  # one exact match
    candidates[4] = []  # an empty caption
    return references, candidates


def test_equals_pycocoevalcap_cider_d_with_the_same_document_frequencies():
    scorer_module = pytest.importorskip("pycocoevalcap.cider.cider_scorer")
    references, candidates = _corpus()
    toolkit = scorer_module.CiderScorer(n=4, sigma=6.0)
    for i in references:
        toolkit += (
            " ".join(map(str, candidates[i])),
            [" ".join(map(str, r)) for r in references[i]],
        )
    _, expected = toolkit.compute_score()
    ours = CiderD(references)
    for i, value in zip(references, expected):
        assert ours.score(i, candidates[i]) == pytest.approx(float(value), abs=1e-9)


def test_cider_d_rewards_the_reference_and_penalises_gaming():
    references = {0: [[5, 6, 7, 8], [5, 6, 9, 8]], 1: [[10, 11, 12]], 2: [[13, 14, 15, 16]]}
    scorer = CiderD(references)
    exact = scorer.score(0, [5, 6, 7, 8])
    assert exact > scorer.score(0, [5, 6, 8]) > scorer.score(0, [13, 14])
    assert scorer.score(0, [13, 14]) == 0.0
    # clipping: repeating a matched word does not raise the score (CIDEr-D, unlike CIDEr)
    assert scorer.score(1, [10, 10, 10, 11, 12]) < scorer.score(1, [10, 11, 12])
    # the Gaussian length penalty: padding a correct caption with unmatched words costs
    assert scorer.score(2, [13, 14, 15, 16, 3, 4, 3, 4, 3, 4]) < scorer.score(2, [13, 14, 15, 16])
    assert scorer.score(0, []) == 0.0


def test_unknown_image_and_empty_corpus_are_errors():
    scorer = CiderD({"a": [[1, 2]]})
    with pytest.raises(KeyError, match="no reference captions"):
        scorer.score("b", [1, 2])
    with pytest.raises(ValueError, match="at least one image"):
        CiderD({})
