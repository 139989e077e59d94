"""VQA/caption data: vocabularies, soft targets, word vectors, feature rows, datasets, collate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from gridfeats.data.synthetic import make_synthetic
from gridfeats.store import FeatureWriter, StoreMetadata, grid_record, region_record
from vqa.data import (
    AnswerVocab,
    CaptionDataset,
    DataFormatError,
    HFQuestionTokenizer,
    ImageRowReader,
    VQADataset,
    WordVocab,
    answer_scores,
    load_word_vectors,
    tokenize,
)
from vqa.data.collate import collate_vqa, pad_token_ids
from vqa.data.image_rows import fitted_grid_size
from vqa.metrics import question_accuracy

FEATURE_DIM = 6


# --------------------------------------------------------------------------- helpers
def _grid_store(path: Path, grids: Dict[int, np.ndarray], dtype: str = "float32") -> Path:
    meta = StoreMetadata(mode="grid", feature_dim=FEATURE_DIM, dtype=dtype)
    with FeatureWriter(str(path), meta, compression="none") as writer:
        for image_id, fmap in grids.items():
            writer.add(image_id, grid_record(fmap, (120, 160), (240, 320)))
    return path


def _region_store(
    path: Path, image_id: int, boxes: np.ndarray, scores: np.ndarray, image_hw=(100, 200)
) -> Path:
    meta = StoreMetadata(mode="region", feature_dim=FEATURE_DIM, attr_topk=2)
    k = len(boxes)
    features = np.arange(k * FEATURE_DIM, dtype=np.float32).reshape(k, FEATURE_DIM)
    with FeatureWriter(str(path), meta, compression="none") as writer:
        writer.add(
            image_id,
            region_record(
                features,
                boxes.astype(np.float32),
                scores.astype(np.float32),
                np.zeros(k, np.int32),
                np.zeros((k, 2), np.int32),
                np.zeros((k, 2), np.float32),
                image_hw,
                (200, 400),
            ),
        )
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Dict[str, Path]:
    """A small synthetic VQA/caption set and a grid store covering all its images."""
    root = tmp_path_factory.mktemp("vqa_data")
    paths = make_synthetic(root / "syn", 10, seed=3)
    instances = json.loads(Path(paths["instances"]).read_text())
    rng = np.random.default_rng(0)
    grids = {}
    for image in instances["images"]:
        h, w = (int(v) for v in rng.integers(2, 6, size=2))
        grids[image["id"]] = rng.standard_normal((FEATURE_DIM, h, w)).astype(np.float32)
    paths["store"] = _grid_store(root / "grid.h5", grids)
    paths["grids"] = grids
    return paths


# --------------------------------------------------------------------------- text and vocab
def test_tokenize_follows_mcan():
    assert tokenize("What's on the left-hand side?") == [
        "whats",
        "on",
        "the",
        "left",
        "hand",
        "side",
    ]
    assert tokenize('Is it "red/blue"; (or) #green*!') == ["is", "it", "red", "blue", "or", "green"]


def test_word_vocab_build_encode_decode_roundtrip(tmp_path):
    vocab = WordVocab.build(["a cat", "a dog", "a cat sat", "rare"], min_count=2)
    assert vocab.itos == ["<pad>", "<unk>", "a", "cat"]  # by count, then alphabetical
    assert vocab.pad_id == 0
    assert vocab.encode("A cat? A bird") == [2, 3, 2, vocab.unk_id]
    assert vocab.encode("a cat a cat", max_length=3) == [2, 3, 2]
    with pytest.raises(KeyError, match="<bos>"):
        _ = vocab.bos_id
    vocab.save(tmp_path / "v.json")
    assert WordVocab.load(tmp_path / "v.json").itos == vocab.itos


def test_caption_vocab_markers():
    vocab = WordVocab.build(["a dog", "a dog"], specials=("<pad>", "<bos>", "<eos>", "<unk>"))
    ids = vocab.encode("a dog runs", max_length=2, add_bos_eos=True)
    assert ids == [vocab.bos_id, vocab.stoi["a"], vocab.stoi["dog"], vocab.eos_id]
    assert vocab.decode(ids + [vocab.stoi["a"]]) == "a dog"  # stops at <eos>


def test_word_vocab_rejects_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text('{"words": 3}')
    with pytest.raises(DataFormatError, match="not a word vocabulary file"):
        WordVocab.load(tmp_path / "bad.json")
    with pytest.raises(DataFormatError, match="file not found"):
        WordVocab.from_questions(tmp_path / "missing.json")


# --------------------------------------------------------------------------- answers
def test_answer_vocab_counts_normalised_multiple_choice_answers(tmp_path):
    def ann(answers):
        return {
            "annotations": [
                {"question_id": i, "multiple_choice_answer": a} for i, a in enumerate(answers)
            ]
        }

    train = ann(["Two", "2", "2.", "yes", "yes", "no", "the cat"])
    val = ann(["cat", "no"])
    vocab = AnswerVocab.build([train, val], min_count=2)
    assert vocab.answers == ["2", "cat", "no", "yes"]  # "Two"/"2"/"2." merge to "2" (3 times)
    assert AnswerVocab.build(train, min_count=3).answers == ["2"]
    vocab.save(tmp_path / "answers.json")
    assert AnswerVocab.load(tmp_path / "answers.json").answers == vocab.answers
    with pytest.raises(DataFormatError, match="no answer occurs at least 99 times"):
        AnswerVocab.build(train, min_count=99)


@pytest.mark.parametrize("matches, expected", [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_scores_are_the_official_accuracy(matches, expected):
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    scores = answer_scores(answers)
    assert scores["red"] == pytest.approx(expected)
    assert scores["red"] == pytest.approx(question_accuracy("red", answers))


def test_soft_scores_follow_the_metric_quirks():
    # All ten wrote "two": the metric (master a013f00) compares the prediction raw then, so only
    # "two" itself would score; the one candidate, normalised to "2", gets nothing.
    assert answer_scores(["two"] * 10) == {}
    # Disagreeing answers get the full normalisation in master: "Yes" and "yes." both become
    # "yes", so the candidate "yes" matches all ten (the 2017 rules, punctuation only: 0.6).
    answers = [{"answer": "Yes", "answer_id": i} for i in range(8)] + [
        {"answer": "yes.", "answer_id": 8 + i} for i in range(2)
    ]
    assert answer_scores(answers) == {"yes": pytest.approx(1.0)}
    assert question_accuracy("yes", answers, revision="v2.0-a4f1afd") == pytest.approx(0.6)


def test_answer_target_vector():
    vocab = AnswerVocab(["yes", "no", "2"])
    target = vocab.target(["yes"] * 8 + ["no", "maybe"])
    assert target.dtype == torch.float32 and target.shape == (3,)
    assert target.tolist() == pytest.approx([1.0, 0.3, 0.0])


# --------------------------------------------------------------------------- word vectors
def test_glove_file_loading(tmp_path):
    vocab = WordVocab(["cat", "dog", "new york", "missing"])
    lines = ["cat 1 2 3", "dog 4 5 6", "new york 7 8 9", "cat 0 0 0", "zebra 1 1 1"]
    (tmp_path / "glove.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    vectors = load_word_vectors(tmp_path / "glove.txt", vocab, seed=1)
    assert vectors.shape == (len(vocab), 3) and vectors.dtype == np.float32
    assert vectors[vocab.stoi["cat"]].tolist() == [1, 2, 3]  # first occurrence wins
    assert vectors[vocab.stoi["new york"]].tolist() == [7, 8, 9]  # spaces inside the word
    assert not vectors[vocab.pad_id].any()
    missing = vectors[vocab.stoi["missing"]]
    assert missing.any() and np.abs(missing).max() < 1.0  # small random, seeded
    again = load_word_vectors(tmp_path / "glove.txt", vocab, seed=1)
    assert np.array_equal(vectors, again)


def test_word2vec_header_and_errors(tmp_path):
    vocab = WordVocab(["cat"])
    (tmp_path / "w2v.txt").write_text("2 2\ncat 0.5 0.25\ndog 1 1\n", encoding="utf-8")
    assert load_word_vectors(tmp_path / "w2v.txt", vocab)[vocab.stoi["cat"]].tolist() == [0.5, 0.25]
    with pytest.raises(DataFormatError, match="holds 2-d vectors, but dim=300"):
        load_word_vectors(tmp_path / "w2v.txt", vocab, dim=300)
    vocab_two = WordVocab(["cat", "dog"])
    (tmp_path / "bad.txt").write_text("dog 1 2\ncat x 2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad.txt:2: non-numeric"):
        load_word_vectors(tmp_path / "bad.txt", vocab_two)
    (tmp_path / "short.txt").write_text("dog 1 2\ncat 2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"short.txt:2: expected a word and 2 values"):
        load_word_vectors(tmp_path / "short.txt", vocab_two)
    with pytest.raises(DataFormatError, match="not found"):
        load_word_vectors(tmp_path / "none.txt", vocab)


# --------------------------------------------------------------------------- HF tokenizer
def test_hf_tokenizer_from_a_local_directory_only(tmp_path):
    with pytest.raises(DataFormatError, match="tokenizer directory not found"):
        HFQuestionTokenizer(tmp_path / "bert-base-uncased")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "what", "color", "is", "the", "cube", "?"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(str(tmp_path / "tok"))
    hf = HFQuestionTokenizer(tmp_path / "tok")
    assert hf.pad_id == 0 and len(hf) == len(words)
    assert hf.encode("What color is the sphere?") == [2, 3, 4, 5, 1, 7]
    assert hf.encode("What color is the sphere?", max_length=3) == [2, 3, 4]


# --------------------------------------------------------------------------- feature rows
def test_grid_rows_and_cell_boxes(tmp_path):
    fmap = np.arange(FEATURE_DIM * 2 * 3, dtype=np.float32).reshape(FEATURE_DIM, 2, 3)
    reader = ImageRowReader(_grid_store(tmp_path / "g.h5", {7: fmap}, dtype="float16"))
    rows = reader.read(7)
    assert rows.grid_hw == (2, 3) and rows.features.dtype == torch.float32
    # row y*w + x is map[:, y, x]; its box is the cell (x/w, y/h, (x+1)/w, (y+1)/h)
    assert torch.equal(rows.features[1 * 3 + 2], torch.from_numpy(fmap[:, 1, 2]))
    assert rows.boxes[1 * 3 + 2].tolist() == pytest.approx([2 / 3, 1 / 2, 1.0, 1.0])
    assert rows.boxes[0].tolist() == pytest.approx([0.0, 0.0, 1 / 3, 1 / 2])


def test_large_grid_is_average_pooled_to_fit(tmp_path):
    fmap = np.random.default_rng(1).standard_normal((FEATURE_DIM, 4, 6)).astype(np.float32)
    reader = ImageRowReader(_grid_store(tmp_path / "g.h5", {1: fmap}), max_rows=6)
    rows = reader.read(1)
    assert rows.grid_hw == (2, 3) and rows.features.shape == (6, FEATURE_DIM)
    block = fmap[:, 2:4, 4:6].mean(axis=(1, 2))  # output cell (y=1, x=2)
    assert rows.features[1 * 3 + 2].numpy() == pytest.approx(block, abs=1e-6)
    assert fitted_grid_size(19, 32, 100) == (7, 12)
    assert fitted_grid_size(1, 500, 100) == (1, 100)
    assert fitted_grid_size(19, 32, 608) == (19, 32)


def test_row_cache_keeps_decoded_images_within_its_bound(tmp_path):
    rng = np.random.default_rng(2)
    maps = {i: rng.standard_normal((FEATURE_DIM, 2, 3)).astype(np.float32) for i in (1, 2, 3)}
    path = _grid_store(tmp_path / "g.h5", maps)
    uncached = ImageRowReader(path)
    one_image = uncached.read(1).features.nbytes + uncached.read(1).boxes.nbytes
    reader = ImageRowReader(path, cache_bytes=2 * one_image)  # room for two of the three images
    reads = []
    store = reader.store

    class CountingStore:  # the same store, recording each read
        mode, feature_dim = store.mode, store.feature_dim

        def __contains__(self, image_id):
            return image_id in store

        def __getitem__(self, image_id):
            reads.append(str(image_id))
            return store[image_id]

    reader.store = CountingStore()
    for image_id in (1, 2, 3, 1, 2, 3, "1"):
        rows = reader.read(image_id)
        assert torch.equal(rows.features, uncached.read(image_id).features)
    assert reads == ["1", "2", "3", "3"]  # 1 and 2 fit the bound; 3 is read every time
    assert reader._cached_bytes == 2 * one_image
    with pytest.raises(ValueError, match="cache_bytes"):
        ImageRowReader(path, cache_bytes=-1)


def test_row_normalization_standardizes_the_rows_heads_see(tmp_path):
    from vqa.data.image_rows import RowNormalization, fit_row_normalization

    rng = np.random.default_rng(3)
    maps = {
        i: (5.0 + 2.0 * rng.standard_normal((FEATURE_DIM, 4, 6))).astype(np.float32)
        for i in range(4)
    }
    for fmap in maps.values():
        fmap[1] = 0.0  # a dead channel: scaled by the floor, not divided by zero
    reader = ImageRowReader(_grid_store(tmp_path / "g.h5", maps), max_rows=6)
    pooled = torch.cat([reader.read(i).features for i in range(4)])  # what the heads get
    norm = fit_row_normalization(reader, [3, 0, 1, 2, 1, "missing"])
    assert torch.allclose(norm.mean, pooled.double().mean(0).float(), atol=1e-5)
    live = torch.arange(FEATURE_DIM) != 1
    assert torch.allclose(
        norm.std[live], pooled.double().std(0, unbiased=False)[live].float(), atol=1e-5
    )
    floor = 0.01 * float(norm.std[live].sum()) / FEATURE_DIM  # 1% of the mean deviation
    assert float(norm.std[1]) == pytest.approx(floor, rel=1e-5)
    reader.set_normalization(norm)
    out = torch.cat([reader.read(i).features for i in range(4)])
    assert torch.allclose(out[:, live].mean(0), torch.zeros(FEATURE_DIM - 1), atol=1e-5)
    assert torch.allclose(
        out[:, live].std(0, unbiased=False), torch.ones(FEATURE_DIM - 1), atol=1e-4
    )
    assert torch.equal(out[:, 1], torch.zeros(len(out)))
    assert torch.equal(RowNormalization.from_state(norm.state()).mean, norm.mean)
    with pytest.raises(ValueError, match="without normalization"):
        fit_row_normalization(reader, [0])
    with pytest.raises(ValueError, match="channels"):
        reader.set_normalization(RowNormalization(torch.zeros(3), torch.ones(3)))


def test_region_rows_normalised_and_top_scoring(tmp_path):
    boxes = np.array([[0, 0, 100, 50], [50, 25, 250, 150], [10, 10, 20, 20]], dtype=np.float32)
    scores = np.array([0.2, 0.9, 0.5])
    reader = ImageRowReader(_region_store(tmp_path / "r.h5", 5, boxes, scores), max_rows=2)
    rows = reader.read("5")
    assert rows.grid_hw == (0, 0)
    # boxes 1 and 2 have the best scores; stored order kept; divided by (w=200, h=100), clipped
    expected = torch.tensor([[0.25, 0.25, 1.0, 1.0], [0.05, 0.1, 0.1, 0.2]])
    assert torch.allclose(rows.boxes, expected)
    assert rows.features[:, 0].tolist() == [1 * FEATURE_DIM, 2 * FEATURE_DIM]


# --------------------------------------------------------------------------- VQA dataset
def test_vqa_dataset_items_and_batch(synthetic):
    vocab = WordVocab.from_questions(synthetic["train_questions"])
    answers = AnswerVocab.build(synthetic["train_annotations"], min_count=1)
    ds = VQADataset(
        synthetic["train_questions"],
        synthetic["store"],
        vocab,
        annotations=synthetic["train_annotations"],
        answer_vocab=answers,
        max_rows=12,
    )
    questions = json.loads(Path(synthetic["train_questions"]).read_text())["questions"]
    annotations = {
        a["question_id"]: a
        for a in json.loads(Path(synthetic["train_annotations"]).read_text())["annotations"]
    }
    assert len(ds) == len(questions)
    item = ds[3]
    assert item["question_id"] == questions[3]["question_id"]
    assert item["question"].tolist() == vocab.encode(questions[3]["question"], 14)
    expected = answer_scores(annotations[item["question_id"]]["answers"])
    for answer, score in expected.items():
        assert item["target"][answers.index(answer)].item() == pytest.approx(score)
    assert item["target"].sum().item() == pytest.approx(sum(expected.values()))

    batch = ds.collate([ds[i] for i in range(4)])
    counts = [ds[i]["rows"].features.shape[0] for i in range(4)]
    assert batch["feats"].shape == (4, max(counts), FEATURE_DIM)
    assert batch["feat_mask"].sum(1).tolist() == counts
    assert not batch["feats"][~batch["feat_mask"]].any()  # padding is zero
    assert batch["target"].shape == (4, len(answers))
    assert batch["question_mask"].sum(1).tolist() == [len(ds[i]["question"]) for i in range(4)]
    assert (batch["question"][~batch["question_mask"]] == 0).all()
    assert batch["question_id"].tolist() == [q["question_id"] for q in questions[:4]]
    assert (batch["grid_hw"].prod(1) <= 12).all()


def test_vqa_dataset_in_worker_processes(synthetic):
    vocab = WordVocab.from_questions(synthetic["train_questions"])
    ds = VQADataset(synthetic["train_questions"], synthetic["store"], vocab)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=ds.collate)
    batches = list(loader)
    seen = torch.cat([batch["question_id"] for batch in batches]).tolist()
    assert sorted(seen) == sorted(ds.question_ids)
    assert all("target" not in batch for batch in batches)  # no annotations: a test split


def test_vqa_dataset_question_truncation_and_hf_style_padding(synthetic):
    class PadOneEncoder:  # e.g. RoBERTa pads with 1
        pad_id = 1

        def encode(self, text, max_length=None):
            return [5, 6, 7, 8][:max_length]

    ds = VQADataset(
        synthetic["val_questions"], synthetic["store"], PadOneEncoder(), max_question_length=2
    )
    batch = ds.collate([ds[0], ds[1]])
    assert batch["question"].tolist() == [[5, 6], [5, 6]]
    assert collate_vqa([ds[0]], question_pad_id=1)["question_mask"].all()
    ids, mask = pad_token_ids([[3], [4, 5]], pad_id=1)
    assert ids.tolist() == [[3, 1], [4, 5]] and mask.tolist() == [[True, False], [True, True]]


def test_vqa_dataset_clear_errors(synthetic, tmp_path):
    vocab = WordVocab.from_questions(synthetic["train_questions"])
    questions = json.loads(Path(synthetic["train_questions"]).read_text())
    missing = dict(
        questions,
        questions=questions["questions"]
        + [{"question_id": 1, "image_id": 987654, "question": "what?"}],
    )
    with pytest.raises(
        DataFormatError,
        match=r"1 image\(s\) of the questions are not in the "
        r"feature store .*987654",
    ):
        VQADataset(missing, synthetic["store"], vocab)
    skipped = VQADataset(missing, synthetic["store"], vocab, missing_images="skip")
    assert len(skipped) == len(questions["questions"])
    with pytest.raises(DataFormatError, match="have no annotation"):
        VQADataset(
            synthetic["train_questions"],
            synthetic["store"],
            vocab,
            annotations=synthetic["val_annotations"],
        )
    with pytest.raises(DataFormatError, match="lacks the key"):
        VQADataset({"questions": [{"question_id": 1}]}, synthetic["store"], vocab)
    with pytest.raises(FileNotFoundError, match="feature store not found"):
        VQADataset(synthetic["train_questions"], tmp_path / "none.h5", vocab)


def test_missing_image_error_names_the_extraction_failure(synthetic, tmp_path):
    path = tmp_path / "with_error.h5"
    meta = StoreMetadata(mode="grid", feature_dim=FEATURE_DIM)
    with FeatureWriter(str(path), meta, compression="none") as writer:
        writer.add(1, grid_record(np.zeros((FEATURE_DIM, 1, 1), np.float32), (9, 9), (9, 9)))
        writer.add_error(2, "truncated image")
    questions = {
        "questions": [
            {"question_id": 1, "image_id": 1, "question": "a"},
            {"question_id": 2, "image_id": 2, "question": "b"},
        ]
    }
    with pytest.raises(DataFormatError, match="extraction failed for 2: truncated image"):
        VQADataset(questions, path, WordVocab(["a"]))


# --------------------------------------------------------------------------- captions
def test_caption_dataset_training_and_per_image_views(synthetic):
    captions = json.loads(Path(synthetic["train_captions"]).read_text())
    vocab = WordVocab.from_captions(captions, min_count=1)
    train = CaptionDataset(captions, synthetic["store"], vocab, max_length=5)
    assert len(train) == len(captions["annotations"])
    item = train[0]
    first = captions["annotations"][0]
    assert train.image_ids[item["image_index"]] == first["image_id"]
    assert item["caption"].tolist() == vocab.encode(first["caption"], 5, add_bos_eos=True)
    assert len(item["caption"]) <= 5 + 2

    batch = train.collate([train[0], train[1]])
    lengths = [len(train[i]["caption"]) - 1 for i in range(2)]
    assert batch["captions_in"][:, 0].tolist() == [vocab.bos_id] * 2
    for row, n in enumerate(lengths):
        assert batch["captions_out"][row, n - 1].item() == vocab.eos_id
        assert torch.equal(batch["captions_in"][row, 1:n], batch["captions_out"][row, : n - 1])
    assert batch["feat_mask"].any(1).all()

    per_image = CaptionDataset(captions, synthetic["store"], vocab, per_image=True)
    assert len(per_image) == len(captions["images"])
    assert "caption" not in per_image[0]
    assert per_image.references(0) == [
        a["caption"] for a in captions["annotations"] if a["image_id"] == per_image.image_ids[0]
    ]
    assert "captions_in" not in per_image.collate([per_image[0]])
