"""Unit tests of the VQA/captioning heads: shapes, masking, positions, decoding, builders."""

from __future__ import annotations

import pytest
import torch

from vqa.models import MCAN, MCAN_SIZES, Pythia, UpDownCaptioner, build_captioner, build_vqa_model
from vqa.models.inputs import grid_cell_boxes, masked_softmax

FEATURE_DIM = 12
TINY = {
    "pythia": dict(
        name="pythia",
        word_dim=8,
        question_hidden=16,
        question_attention=8,
        image_dim=16,
        fusion_dim=24,
        classifier_hidden=24,
    ),
    "mcan": dict(
        name="mcan", hidden=16, heads=4, ffn=32, flat_mlp=16, flat_out=24, layers=2, word_dim=8
    ),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _batch(batch=3, rows=7, tokens=5, vocab=20):
    feats = torch.randn(batch, rows, FEATURE_DIM)
    mask = torch.ones(batch, rows, dtype=torch.bool)
    boxes = torch.rand(batch, rows, 4)
    question = torch.randint(1, vocab, (batch, tokens))
    if batch > 1:
        mask[1, 4:] = False
        question[0, 3:] = 0
    return feats, mask, boxes, question


def _tiny_vqa(name, **extra):
    model = build_vqa_model(
        {**TINY[name], **extra}, vocab_size=20, num_answers=11, feature_dim=FEATURE_DIM
    )
    return model.eval()


@pytest.mark.parametrize("name", ["pythia", "mcan"])
def test_vqa_models_give_one_logit_per_answer(name):
    feats, mask, boxes, question = _batch()
    logits = _tiny_vqa(name)(feats, mask, boxes, question)
    assert logits.shape == (3, 11)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["pythia", "mcan"])
def test_padded_rows_and_tokens_do_not_change_the_answer(name):
    model = _tiny_vqa(name)
    feats, mask, boxes, question = _batch()
    reference = model(feats, mask, boxes, question)
    changed = feats.clone()
    changed[1, 4:] = 1000.0  # padding rows of image 1
    other_boxes = boxes.clone()
    other_boxes[1, 4:] = 0.5
    longer = torch.cat([question, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # more padding
    out = model(changed, mask, other_boxes, longer)
    assert torch.allclose(out, reference, atol=1e-5)
    # a real row does matter
    changed[1, 0] += 5.0
    assert not torch.allclose(model(changed, mask, boxes, question)[1], reference[1], atol=1e-4)


@pytest.mark.parametrize("name", ["pythia", "mcan"])
def test_row_positions_are_used_only_when_enabled(name):
    feats, mask, boxes, question = _batch()
    shifted = (boxes + 0.3).clamp(max=1.0)
    with_position = _tiny_vqa(name)
    assert not torch.allclose(
        with_position(feats, mask, boxes, question), with_position(feats, mask, shifted, question)
    )
    without = _tiny_vqa(name, use_position=False)
    assert torch.equal(
        without(feats, mask, boxes, question), without(feats, mask, shifted, question)
    )


def test_explicit_question_mask_matches_padding_rule():
    model = _tiny_vqa("mcan")
    feats, mask, boxes, question = _batch()
    assert torch.allclose(
        model(feats, mask, boxes, question, question != 0), model(feats, mask, boxes, question)
    )


def test_pythia_uses_weight_normalised_classifier_and_two_glimpses():
    model = _tiny_vqa("pythia")
    assert isinstance(model, Pythia)
    wn_layers = [m for m in model.classifier if hasattr(m, "parametrizations")]
    assert len(wn_layers) == 2
    assert model.question_encoder.out_dim == 2 * 16


def test_mcan_sizes_follow_the_paper():
    assert MCAN_SIZES["small"] == {
        "hidden": 512,
        "heads": 8,
        "ffn": 2048,
        "flat_mlp": 512,
        "flat_out": 1024,
    }
    assert MCAN_SIZES["large"]["hidden"] == 1024 and MCAN_SIZES["large"]["heads"] == 16
    large = MCAN(vocab_size=10, num_answers=5, feature_dim=8, size="large", layers=1, word_dim=4)
    assert large.classifier.in_features == 2048
    assert large.encoder[0].attention.heads == 16
    assert large.encoder[0].ffn[0].out_features == 4096
    assert len(_tiny_vqa("mcan").decoder) == 2


def test_builders_reject_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown VQA model 'bert'"):
        build_vqa_model({"name": "bert"}, 10, 5, 8)
    with pytest.raises(ValueError, match="unknown option.*hiden"):
        build_vqa_model({"name": "mcan", "hiden": 3}, 10, 5, 8)
    with pytest.raises(ValueError, match="unknown MCAN size"):
        build_vqa_model({"name": "mcan", "size": "huge"}, 10, 5, 8)
    with pytest.raises(ValueError, match="divisible"):
        build_vqa_model({"name": "mcan", "size": None, "hidden": 10, "heads": 4}, 10, 5, 8)


def test_grid_cell_boxes_follow_row_major_store_order():
    boxes = grid_cell_boxes(2, 3)
    assert boxes.shape == (6, 4)
    # row y*w + x covers (x/w, y/h, (x+1)/w, (y+1)/h)
    assert torch.allclose(boxes[4], torch.tensor([1 / 3, 1 / 2, 2 / 3, 1.0]))
    assert torch.allclose(boxes[0], torch.tensor([0.0, 0.0, 1 / 3, 1 / 2]))


def test_masked_softmax_of_an_empty_row_is_zero_not_nan():
    weights = masked_softmax(
        torch.zeros(2, 3), torch.tensor([[True, False, True], [False] * 3]), dim=1
    )
    assert torch.allclose(weights[0], torch.tensor([0.5, 0.0, 0.5]))
    assert torch.equal(weights[1], torch.zeros(3))


# --------------------------------------------------------------------------- captioner
def _captioner(**extra) -> UpDownCaptioner:
    options = dict(hidden=16, attention_dim=8, word_dim=8, dropout=0.0, **extra)
    return build_captioner(
        options, vocab_size=15, feature_dim=FEATURE_DIM, bos_id=1, eos_id=2
    ).eval()


def test_captioner_teacher_forcing_shape_and_masking():
    model = _captioner()
    feats, mask, boxes, _ = _batch()
    captions = torch.randint(3, 15, (3, 6))
    logits = model(feats, mask, boxes, captions)
    assert logits.shape == (3, 6, 15)
    changed = feats.clone()
    changed[1, 4:] = -50.0
    assert torch.allclose(model(changed, mask, boxes, captions), logits, atol=1e-5)


def test_greedy_sampling_stops_at_eos_and_never_emits_padding_or_bos():
    model = _captioner()
    feats, mask, boxes, _ = _batch()
    tokens, logprobs = model.sample(feats, mask, boxes, max_len=12)
    for row, row_logprobs in zip(tokens.tolist(), logprobs):
        if 2 in row:
            end = row.index(2)
            assert all(t == 0 for t in row[end + 1 :])
            assert torch.all(row_logprobs[end + 1 :] == 0)
            row = row[:end]
        assert 0 not in row and 1 not in row
    assert (logprobs <= 0).all()


def test_beam_of_one_equals_greedy_decoding():
    model = _captioner()
    feats, mask, boxes, _ = _batch()
    greedy, _ = model.sample(feats, mask, boxes, max_len=8)
    beam = model.beam_search(feats, mask, boxes, beam_size=1, max_len=8)
    assert torch.equal(beam[:, : greedy.shape[1]], greedy)


def test_beam_search_finds_the_better_sequence_greedy_misses():
    """A hand-set step function where greedy's first word leads to a poor continuation."""
    model = _captioner()
    # vocabulary: 0 pad, 1 bos, 2 eos, 3 "a", 4 "b". After bos: a 0.6, b 0.4. After a: eos 0.45
    # (the rest spread), after b: eos 1.0. Greedy takes a, eos (p = 0.27); beam finds b, eos (0.4).
    table = {1: {3: 0.6, 4: 0.4}, 3: {2: 0.45, 5: 0.3, 6: 0.25}, 4: {2: 1.0}}

    def step(words, state, image):
        probs = torch.full((words.shape[0], 15), 1e-9)
        for i, w in enumerate(words.tolist()):
            for token, p in table.get(w, {2: 1.0}).items():
                probs[i, token] = p
        return probs.log(), state

    model.step = step
    feats, mask, boxes, _ = _batch(batch=1)
    greedy, _ = model.sample(feats, mask, boxes, max_len=4)
    assert greedy[0, :2].tolist() == [3, 2]
    best = model.beam_search(feats, mask, boxes, beam_size=2, max_len=4)
    assert best[0, :2].tolist() == [4, 2]


def test_forward_sample_mode_is_the_sampler():
    model = _captioner()
    feats, mask, boxes, _ = _batch()
    direct, _ = model.sample(feats, mask, boxes, max_len=5)
    via_forward, _ = model(feats, mask, boxes, mode="sample", max_len=5)
    assert torch.equal(direct, via_forward)
    with pytest.raises(ValueError, match="captions_in"):
        model(feats, mask, boxes)


def test_captioner_rejects_special_ids_outside_vocab():
    with pytest.raises(ValueError, match="bos_id"):
        build_captioner({}, vocab_size=5, feature_dim=4, bos_id=0, eos_id=2)


@pytest.mark.parametrize("name", ["pythia", "mcan"])
def test_local_transformers_text_encoder_replaces_the_lstm(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    model = _tiny_vqa(name, text_encoder=str(tmp_path))
    owner = model.question_encoder if name == "pythia" else model
    assert owner.text_encoder is not None and not hasattr(owner, "lstm")
    feats, mask, boxes, question = _batch()
    assert model(feats, mask, boxes, question, question != 0).shape == (3, 11)


def test_text_encoder_directory_must_exist_locally(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        _tiny_vqa("mcan", text_encoder=str(tmp_path / "bert-base-uncased"))
