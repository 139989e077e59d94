"""Training the Up-Down captioner on synthetic features: learning, SCST, CLI round trip.

The cheap tests caption each synthetic image by its largest object ("a large red circle", built
here from ``instances.json``) so that a tiny model learns in seconds; the full synthetic captions
(many sentence templates) need minutes and are in the slow test and in
``python -m vqa.examples.heads_demo``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from gridfeats.cli import main as gridfeats_main
from gridfeats.engine import read_metrics
from vqa.data import tokenize
from vqa.engine.caption_task import CaptionTask
from vqa.engine.checkpoint import FINAL, load_checkpoint
from vqa.engine.cider_reward import CiderD
from vqa.engine.commands import task_defaults
from vqa.engine.config import load_config
from vqa.examples.synthetic_features import make_feature_dataset

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "model": {"hidden": 64, "attention_dim": 32, "word_dim": 32, "dropout": 0.0},
    "optim": {"lr": 5.0e-3, "grad_clip": 1.0},
    "schedule": {"milestones": []},
}


def _largest_object_captions(root: Path) -> None:
    """Writes ``{split}_simple.json``: each image captioned by its largest object."""
    instances = json.loads((root / "annotations" / "instances.json").read_text())
    attributes = {a["id"]: a["name"] for a in instances["attributes"]}
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    largest = {}
    for obj in instances["annotations"]:
        if obj["image_id"] not in largest or obj["area"] > largest[obj["image_id"]]["area"]:
            largest[obj["image_id"]] = obj
    for split in ("train", "val"):
        doc = json.loads((root / "captions" / f"{split}_captions.json").read_text())
        captions = []
        for image in doc["images"]:
            obj = largest[image["id"]]
            names = sorted(
                (attributes[i] for i in obj["attribute_ids"]),
                key=lambda n: n not in ("small", "large"),
            )  # size before colour
            text = " ".join(["a", *names, categories[obj["category_id"]]])
            captions.append({"image_id": image["id"], "id": image["id"], "caption": text})
        doc["annotations"] = captions
        (root / f"{split}_simple.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = make_feature_dataset(
            tmp_path_factory.mktemp("caption_synthetic"), 160, seed=0, modes=("region",)
        )
    finally:
        torch.set_num_threads(saved)
    _largest_object_captions(paths["root"])
    paths["train_simple"] = paths["root"] / "train_simple.json"
    paths["val_simple"] = paths["root"] / "val_simple.json"
    return paths


def write_config(tmp_path: Path, synthetic, captions: str = "simple", **sections) -> Path:
    config = {
        "_BASE_": str(REPO / "configs" / "vqa" / "updown.yaml"),
        **TINY,
        "data": {
            "features": str(synthetic["region_features"]),
            "train_captions": str(synthetic[f"train_{captions}"]),
            "val_captions": str(synthetic[f"val_{captions}"]),
            "min_word_count": 1,
        },
        "scst": {"start_epoch": None},
        "train": {
            "batch_size": 16,
            "eval_batch_size": 64,
            "progress": False,
            "device": "cpu",
            "checkpoint_every_steps": 0,
        },
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = tmp_path / "updown.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def constant_caption_cider(train_captions: Path, val_captions: Path) -> float:
    """CIDEr-D (same scorer as the trainer's validation) of the most frequent training caption."""
    train = json.loads(train_captions.read_text())["annotations"]
    constant = Counter(a["caption"] for a in train).most_common(1)[0][0]
    references = {}
    for a in json.loads(val_captions.read_text())["annotations"]:
        references.setdefault(a["image_id"], []).append(tokenize(a["caption"]))
    scorer = CiderD(references)
    return sum(scorer.score(i, tokenize(constant)) for i in references) / len(references)


def _eval_records(out: Path):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def cross_entropy_run(tmp_path_factory, synthetic):
    """Ten epochs of cross-entropy on the largest-object captions (shared by two tests)."""
    tmp_path = tmp_path_factory.mktemp("ce_run")
    config = write_config(tmp_path, synthetic, train={"epochs": 10, "log_every_steps": 2})
    out = tmp_path / "run"
    assert gridfeats_main(["caption", "train", "--config", str(config), "--out", str(out)]) == 0
    return config, out


def test_captioner_beats_a_constant_caption(synthetic, cross_entropy_run):
    _, out = cross_entropy_run
    cider = _eval_records(out)[-1]["CIDEr-D"]
    constant = constant_caption_cider(synthetic["train_simple"], synthetic["val_simple"])
    assert cider >= 3 * constant and cider >= constant + 1.0, (cider, constant)


def test_self_critical_fine_tuning_raises_reward_and_cider(tmp_path, cross_entropy_run):
    config, ce_out = cross_entropy_run
    out = tmp_path / "scst"
    shutil.copytree(ce_out, out)
    # resume the finished cross-entropy run with three more epochs of SCST
    assert (
        gridfeats_main(
            [
                "caption",
                "train",
                "--config",
                str(config),
                "--out",
                str(out),
                "--resume",
                "train.epochs=13",
                "scst.start_epoch=10",
                "scst.baseline=mean",
                "scst.samples_per_image=5",
            ]
        )
        == 0
    )
    records = read_metrics(out / "metrics.jsonl")
    rewards = {
        epoch: [r["reward"] for r in records if r["kind"] == "train" and r["epoch"] == epoch]
        for epoch in (10, 12)
    }
    assert rewards[10] and rewards[12]
    assert all("reward" not in r for r in records if r["kind"] == "train" and r["epoch"] < 10)
    assert sum(rewards[12]) / len(rewards[12]) > sum(rewards[10]) / len(rewards[10])
    evals = _eval_records(out)
    assert [r["epoch"] for r in evals][-4:] == [10, 11, 12, 13]
    assert evals[-1]["CIDEr-D"] > evals[-4]["CIDEr-D"]


def test_sampled_log_probabilities_match_teacher_forcing(tmp_path, synthetic):
    cfg = load_config(write_config(tmp_path, synthetic), task_defaults("caption"))
    torch.manual_seed(0)
    task = CaptionTask(cfg)
    model = task.model.eval()
    batch = task.collate([task.train_dataset[i] for i in range(4)])
    inputs = (batch["feats"], batch["feat_mask"], batch["boxes"])
    tokens, logprobs = model.sample(*inputs, max_len=6, greedy=False, samples_per_image=2)
    assert tokens.shape[0] == 8
    repeated = [t.repeat_interleave(2, dim=0) for t in inputs]
    bos = torch.full((8, 1), model.bos_id, dtype=torch.long)
    logits = model(*repeated, torch.cat([bos, tokens[:, :-1]], dim=1))
    expected = torch.log_softmax(logits, -1).gather(2, tokens.clamp(min=0).unsqueeze(2))[..., 0]
    mask = tokens != 0
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5)
    # self-critical loss: finite, and it has gradients for the language model
    model.train()
    loss = task.self_critical_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.output.weight.grad.abs().sum() > 0


@pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need Java")
def test_train_predict_eval_round_trip(tmp_path, synthetic, capsys):
    pytest.importorskip("pycocoevalcap")
    config = write_config(tmp_path, synthetic, train={"epochs": 2})
    out = tmp_path / "run"
    assert gridfeats_main(["caption", "train", "--config", str(config), "--out", str(out)]) == 0
    results = tmp_path / "captions.json"
    assert (
        gridfeats_main(
            [
                "caption",
                "predict",
                "--checkpoint",
                str(out / FINAL),
                "--images",
                str(synthetic["val_simple"]),
                "--out",
                str(results),
                "--beam-size",
                "2",
            ]
        )
        == 0
    )
    captions = json.loads(results.read_text())
    images = json.loads(synthetic["val_simple"].read_text())["images"]
    assert [c["image_id"] for c in captions] == [i["id"] for i in images]
    assert all(isinstance(c["caption"], str) and c["caption"] for c in captions)

    metrics_path = tmp_path / "metrics.json"
    capsys.readouterr()
    assert (
        gridfeats_main(
            [
                "caption",
                "eval",
                "--annotations",
                str(synthetic["val_simple"]),
                "--results",
                str(results),
                "--out",
                str(metrics_path),
                "--no-spice",
            ]
        )
        == 0
    )
    metrics = json.loads(metrics_path.read_text())
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics)
    assert f"CIDEr: {metrics['CIDEr']:.4f}" in capsys.readouterr().out


def test_predict_defaults_to_every_stored_image(tmp_path, synthetic):
    config = write_config(tmp_path, synthetic, train={"epochs": 1})
    out = tmp_path / "run"
    assert gridfeats_main(["caption", "train", "--config", str(config), "--out", str(out)]) == 0
    results = tmp_path / "all.json"
    assert (
        gridfeats_main(["caption", "predict", "--checkpoint", str(out), "--out", str(results)]) == 0
    )
    assert len(json.loads(results.read_text())) == 160
    assert load_checkpoint(out / FINAL, kind="caption")["task"]["vocab"]["specials"][0] == "<pad>"


@pytest.mark.slow
def test_captioner_beats_a_constant_caption_on_full_synthetic_captions(tmp_path_factory):
    paths = make_feature_dataset(
        tmp_path_factory.mktemp("full_captions"), 300, seed=1, modes=("region",)
    )
    paths["train_full"], paths["val_full"] = paths["train_captions"], paths["val_captions"]
    tmp_path = tmp_path_factory.mktemp("full_run")
    config = write_config(
        tmp_path,
        paths,
        captions="full",
        model={"hidden": 128},
        optim={"lr": 3.0e-3},
        train={"epochs": 8, "batch_size": 32},
    )
    out = tmp_path / "run"
    assert gridfeats_main(["caption", "train", "--config", str(config), "--out", str(out)]) == 0
    cider = _eval_records(out)[-1]["CIDEr-D"]
    assert cider >= 1.5 * constant_caption_cider(paths["train_full"], paths["val_full"])


def test_standardized_features_are_kept_in_the_checkpoint_and_applied_by_predict(
    tmp_path, synthetic
):
    from vqa.data.image_rows import ImageRowReader, fit_row_normalization

    config = write_config(tmp_path, synthetic, train={"epochs": 2})
    out = tmp_path / "run"
    train = ["caption", "train", "--config", str(config), "--out", str(out)]
    assert gridfeats_main([*train, "data.feature_norm=standardize"]) == 0
    final = load_checkpoint(out / FINAL, kind="caption")
    saved = final["task"]["feature_norm"]
    train_ids = [
        a["image_id"] for a in json.loads(synthetic["train_simple"].read_text())["annotations"]
    ]
    expected = fit_row_normalization(ImageRowReader(synthetic["region_features"], 100), train_ids)
    assert torch.allclose(torch.tensor(saved["mean"]), expected.mean)
    assert torch.allclose(torch.tensor(saved["std"]), expected.std)
    # predict (from the checkpoint alone) decodes what validation decoded: the same CIDEr-D
    results = tmp_path / "captions.json"
    predict = ["caption", "predict", "--checkpoint", str(out / FINAL), "--out", str(results)]
    assert gridfeats_main([*predict, "--images", str(synthetic["val_simple"])]) == 0
    references = {}
    for a in json.loads(synthetic["val_simple"].read_text())["annotations"]:
        references.setdefault(a["image_id"], []).append(tokenize(a["caption"]))
    scorer = CiderD(references)
    captions = json.loads(results.read_text())
    cider = sum(scorer.score(c["image_id"], tokenize(c["caption"])) for c in captions)
    assert cider / len(captions) == pytest.approx(final["metrics"]["CIDEr-D"], abs=1e-9)
