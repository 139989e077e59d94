"""Training the VQA heads on synthetic features: learning, CLI round trip, exact resume after kill.

Features come from ``vqa.examples.synthetic_features`` (stores written through the project's
FeatureWriter that encode each synthetic object's shape/colour/size where it is), so the heads
can learn in seconds; models are tiny instances of the shipped configs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gridfeats.cli import main as gridfeats_main
from gridfeats.engine import KILL_ENV, read_metrics
from vqa.engine.checkpoint import FINAL, LAST, CheckpointError, load_checkpoint
from vqa.engine.vqa_task import majority_answer
from vqa.examples.synthetic_features import make_feature_dataset
from vqa.metrics import evaluate_vqa

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "vqa"
TINY_MODELS = {
    "pythia": {
        "word_dim": 32,
        "question_hidden": 64,
        "question_attention": 32,
        "image_dim": 128,
        "fusion_dim": 256,
        "classifier_hidden": 256,
        "dropout": 0.1,
    },
    "mcan-small": {
        "size": None,
        "hidden": 64,
        "heads": 4,
        "ffn": 128,
        "flat_mlp": 64,
        "flat_out": 128,
        "layers": 2,
        "word_dim": 32,
    },
}
TINY_TRAINING = {
    "pythia": {"optim": {"lr": 0.003}, "schedule": {"warmup": 20, "milestones": []}},
    "mcan-small": {"optim": {"lr": 1.0e-3}, "schedule": {"warmup": 1, "milestones": []}},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    torch.set_num_threads(1)
    return make_feature_dataset(
        tmp_path_factory.mktemp("vqa_synthetic"), 160, seed=0, modes=("grid", "region")
    )


def write_config(tmp_path: Path, synthetic, model: str, mode: str, **train) -> Path:
    """A YAML inheriting a shipped config, with a tiny model and the synthetic data."""
    config = {
        "_BASE_": str(CONFIGS / f"{model}.yaml"),
        "model": TINY_MODELS[model],
        "data": {
            "features": str(synthetic[f"{mode}_features"]),
            "train_questions": str(synthetic["train_questions"]),
            "train_annotations": str(synthetic["train_annotations"]),
            "val_questions": str(synthetic["val_questions"]),
            "val_annotations": str(synthetic["val_annotations"]),
            "min_answer_count": 1,
        },
        **TINY_TRAINING[model],
        "train": {
            "batch_size": 32,
            "eval_batch_size": 64,
            "progress": False,
            "device": "cpu",
            "checkpoint_every_steps": 0,
            **train,
        },
    }
    path = tmp_path / f"{model}-{mode}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def majority_accuracy(synthetic) -> float:
    answer = majority_answer(synthetic["train_annotations"])
    questions = json.loads(Path(synthetic["val_questions"]).read_text())["questions"]
    results = [{"question_id": q["question_id"], "answer": answer} for q in questions]
    return evaluate_vqa(synthetic["val_annotations"], synthetic["val_questions"], results)[
        "overall"
    ]


# --------------------------------------------------------------------------- learning
@pytest.mark.parametrize("model,mode,epochs", [("mcan-small", "region", 8), ("pythia", "grid", 8)])
def test_head_beats_majority_answer_on_held_out_questions(tmp_path, synthetic, model, mode, epochs):
    config = write_config(tmp_path, synthetic, model, mode, epochs=epochs)
    out = tmp_path / "run"
    assert gridfeats_main(["vqa", "train", "--config", str(config), "--out", str(out)]) == 0
    final = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"][-1]
    baseline = majority_accuracy(synthetic)
    assert final["overall"] >= baseline + 10.0, (final["overall"], baseline)


@pytest.mark.slow
@pytest.mark.parametrize("model,mode", [("mcan-small", "grid"), ("pythia", "region")])
def test_head_learns_on_the_other_feature_mode(tmp_path, synthetic, model, mode):
    config = write_config(tmp_path, synthetic, model, mode, epochs=12)
    out = tmp_path / "run"
    assert gridfeats_main(["vqa", "train", "--config", str(config), "--out", str(out)]) == 0
    final = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert final["overall"] >= majority_accuracy(synthetic) + 10.0


# --------------------------------------------------------------------------- CLI round trip
def test_train_predict_eval_round_trip(tmp_path, synthetic, capsys):
    config = write_config(tmp_path, synthetic, "mcan-small", "grid", epochs=1)
    out = tmp_path / "run"
    assert (
        gridfeats_main(
            ["vqa", "train", "--config", str(config), "--out", str(out), "model.layers=1"]
        )
        == 0
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["layers"] == 1 and saved["optim"]["betas"] == [0.9, 0.98]

    results = tmp_path / "results.json"
    assert (
        gridfeats_main(
            [
                "vqa",
                "predict",
                "--checkpoint",
                str(out),
                "--questions",
                str(synthetic["val_questions"]),
                "--out",
                str(results),
            ]
        )
        == 0
    )
    answers = json.loads(results.read_text())
    questions = json.loads(Path(synthetic["val_questions"]).read_text())["questions"]
    assert sorted(a["question_id"] for a in answers) == sorted(q["question_id"] for q in questions)
    assert all(
        set(a) == {"question_id", "answer"} and isinstance(a["answer"], str) for a in answers
    )

    metrics_path = tmp_path / "metrics.json"
    capsys.readouterr()
    assert (
        gridfeats_main(
            [
                "vqa",
                "eval",
                "--annotations",
                str(synthetic["val_annotations"]),
                "--questions",
                str(synthetic["val_questions"]),
                "--results",
                str(results),
                "--out",
                str(metrics_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    metrics = json.loads(metrics_path.read_text())
    assert set(metrics) == {"overall", "perAnswerType", "perQuestionType"}
    assert f"Overall Accuracy is: {metrics['overall']:.2f}" in printed
    assert "Per Question Type Accuracy is the following:" in printed
    # predict on the stored weights reproduces the validation score the trainer logged
    final = load_checkpoint(out / FINAL, kind="vqa")
    assert metrics["overall"] == final["metrics"]["overall"]


def test_standardized_features_are_fitted_on_train_images_and_kept_in_the_checkpoint(
    tmp_path, synthetic, capsys
):
    from vqa.data.image_rows import ImageRowReader, fit_row_normalization

    config = write_config(tmp_path, synthetic, "pythia", "grid", epochs=1)
    out = tmp_path / "run"
    train = ["vqa", "train", "--config", str(config), "--out", str(out)]
    assert gridfeats_main([*train, "data.feature_norm=standardize"]) == 0
    final = load_checkpoint(out / FINAL, kind="vqa")
    saved = final["task"]["feature_norm"]
    train_ids = [
        q["image_id"]
        for q in json.loads(Path(synthetic["train_questions"]).read_text())["questions"]
    ]
    expected = fit_row_normalization(ImageRowReader(synthetic["grid_features"], 100), train_ids)
    assert torch.allclose(torch.tensor(saved["mean"]), expected.mean)
    assert torch.allclose(torch.tensor(saved["std"]), expected.std)
    assert float(expected.std.min()) > 0
    # predict (from the checkpoint alone) applies the training statistics: same score as logged
    results = tmp_path / "results.json"
    predict = ["vqa", "predict", "--checkpoint", str(out), "--out", str(results)]
    assert gridfeats_main([*predict, "--questions", str(synthetic["val_questions"])]) == 0
    metrics = evaluate_vqa(
        synthetic["val_annotations"],
        synthetic["val_questions"],
        json.loads(results.read_text()),
    )
    assert metrics["overall"] == final["metrics"]["overall"]
    capsys.readouterr()
    assert gridfeats_main([*train[:-1], str(tmp_path / "bad"), "data.feature_norm=zscore"]) == 2
    assert "data.feature_norm must be one of" in capsys.readouterr().err


def test_user_errors_are_one_line_messages(tmp_path, synthetic, capsys):
    config = write_config(tmp_path, synthetic, "pythia", "grid", epochs=1)
    assert (
        gridfeats_main(
            ["vqa", "train", "--config", str(config), "--out", str(tmp_path / "r"), "train.epoch=2"]
        )
        == 2
    )
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err

    assert (
        gridfeats_main(
            [
                "vqa",
                "train",
                "--config",
                str(config),
                "--out",
                str(tmp_path / "r"),
                f"data.train_questions={tmp_path / 'nope.json'}",
            ]
        )
        == 2
    )
    assert "VQA questions file not found" in capsys.readouterr().err

    bad_results = tmp_path / "results.json"
    bad_results.write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
    assert (
        gridfeats_main(
            [
                "vqa",
                "eval",
                "--annotations",
                str(synthetic["val_annotations"]),
                "--results",
                str(bad_results),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("gridfeats vqa: error:") and "no prediction" in err

    assert (
        gridfeats_main(
            [
                "vqa",
                "predict",
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--questions",
                str(synthetic["val_questions"]),
                "--out",
                str(tmp_path / "o.json"),
            ]
        )
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path, synthetic, capsys):
    config = write_config(tmp_path, synthetic, "mcan-small", "region", epochs=1)
    out = tmp_path / "run"
    assert (
        gridfeats_main(
            ["vqa", "train", "--config", str(config), "--out", str(out), "model.layers=1"]
        )
        == 0
    )
    with pytest.raises(CheckpointError, match="'vqa' checkpoint, expected a 'caption'"):
        load_checkpoint(out / FINAL, kind="caption")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")

    # a checkpoint from before the engine still predicts, but is not resumed
    from vqa.engine.checkpoint import PRE_ENGINE_FORMAT

    old = {**load_checkpoint(out / FINAL), "format": PRE_ENGINE_FORMAT}
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    torch.save(old, old_run / LAST)
    assert load_checkpoint(old_run / LAST, kind="vqa")["model"].keys() == old["model"].keys()
    assert (
        gridfeats_main(
            ["vqa", "train", "--config", str(config), "--out", str(old_run), "--resume"]
            + ["model.layers=1"]
        )
        == 2
    )
    assert "holds no resumable training state" in capsys.readouterr().err


# --------------------------------------------------------------------------- kill and resume
def _train_subprocess(config: Path, out: Path, *extra: str, kill_at: int = 0):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = str(kill_at)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gridfeats",
            "vqa",
            "train",
            "--config",
            str(config),
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_killed_mid_epoch_resumes_to_identical_weights_and_metrics(tmp_path, synthetic):
    # 10 steps per epoch (640 questions, batches of 64); checkpoints every 3 steps; killed right
    # after step 7, so the resume starts from the step-6 checkpoint in the middle of the first
    # epoch and redoes step 7.
    config = write_config(
        tmp_path,
        synthetic,
        "mcan-small",
        "region",
        epochs=2,
        batch_size=64,
        checkpoint_every_steps=3,
        deterministic=True,
        log_every_steps=1,
    )
    extra = ("model.layers=1",)
    straight = _train_subprocess(config, tmp_path / "straight", *extra)
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    killed = _train_subprocess(config, killed_dir, *extra, kill_at=7)
    assert killed.returncode == -signal.SIGKILL
    assert not (killed_dir / FINAL).exists()
    position = load_checkpoint(killed_dir / LAST)["position"]
    assert position["iteration"] == 6 and position["batch"] != 0  # a mid-epoch checkpoint

    resumed = _train_subprocess(config, killed_dir, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a = load_checkpoint(tmp_path / "straight" / FINAL)
    b = load_checkpoint(killed_dir / FINAL)
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["metrics"] == b["metrics"]
    log_a = [
        (r["kind"], r["step"], r.get("loss"), r.get("overall"))
        for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
    ]
    log_b = [
        (r["kind"], r["step"], r.get("loss"), r.get("overall"))
        for r in read_metrics(killed_dir / "metrics.jsonl")
    ]
    assert log_a == log_b


# --------------------------------------------------------------------------- engine pieces
def test_mcan_and_pythia_learning_rate_schedules():
    from vqa.engine.schedules import WarmupStepDecay

    mcan = WarmupStepDecay(
        steps_per_epoch=10,
        unit="epoch",
        warmup=3,
        warmup_method="staircase",
        milestones=[10, 12],
        gamma=0.2,
    )
    per_epoch = [mcan(epoch * 10 + 5) for epoch in range(13)]
    assert per_epoch[:4] == [0.25, 0.5, 0.75, 1.0]
    assert per_epoch[9] == 1.0 and per_epoch[10] == pytest.approx(0.2)
    assert per_epoch[12] == pytest.approx(0.04)
    pythia = WarmupStepDecay(
        steps_per_epoch=100,
        unit="step",
        warmup=1000,
        warmup_method="linear",
        warmup_factor=0.2,
        milestones=[5000, 7000, 9000, 11000],
        gamma=0.1,
    )
    assert pythia(0) == pytest.approx(0.2) and pythia(500) == pytest.approx(0.6)
    assert pythia(1000) == 1.0 and pythia(4999) == 1.0
    assert pythia(5000) == pytest.approx(0.1) and pythia(11000) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="warmup_method"):
        WarmupStepDecay(steps_per_epoch=1, warmup_method="cosine")


def test_scheduler_state_resumes_the_same_learning_rates():
    from vqa.engine.schedules import build_scheduler

    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        cfg = {
            "unit": "step",
            "warmup": 4,
            "warmup_method": "linear",
            "milestones": [6],
            "gamma": 0.5,
        }
        return optimizer, build_scheduler(optimizer, cfg, steps_per_epoch=3)

    optimizer, scheduler = make()
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    optimizer2, scheduler2 = make()
    for _ in range(3):
        optimizer2.step()
        scheduler2.step()
    optimizer3, scheduler3 = make()  # restored as the trainer does: optimizer, then scheduler
    optimizer3.load_state_dict(optimizer2.state_dict())
    scheduler3.load_state_dict(scheduler2.state_dict())
    resumed = []
    for _ in range(5):
        resumed.append(optimizer3.param_groups[0]["lr"])
        optimizer3.step()
        scheduler3.step()
    assert resumed == pytest.approx(lrs[3:])


def test_batch_order_is_a_function_of_seed_and_epoch_and_shards_cover_the_data():
    from gridfeats.engine import ResumableBatchSampler

    sampler = ResumableBatchSampler(23, batch_size=4, seed=7)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    assert sorted(i for b in epoch2 for i in b) == list(range(23))
    sampler.set_epoch(2, skip_batches=3)
    assert list(sampler) == epoch2[3:] and len(sampler) == len(epoch2) - 3
    sampler.set_epoch(3)
    assert list(sampler) != epoch2
    shards = []
    for rank in range(3):
        shard = ResumableBatchSampler(23, batch_size=4, seed=7, rank=rank, world_size=3)
        shard.set_epoch(2)
        shards.append([i for b in shard for i in b])
    assert len({len(s) for s in shards}) == 1  # equal shard sizes (padded), as DDP needs
    assert set().union(*shards) == set(range(23))


def test_config_inheritance_overrides_and_unknown_keys(tmp_path):
    from gridfeats.config import ConfigError
    from vqa.engine.commands import task_defaults
    from vqa.engine.config import load_config

    large = load_config(
        CONFIGS / "mcan-large.yaml",
        task_defaults("vqa"),
        ["train.epochs=2", "optim.betas=[0.8, 0.9]", "model.layers=4"],
    )
    assert large["model"] == {
        "name": "mcan",
        "layers": 4,
        "word_dim": 300,
        "dropout": 0.1,
        "flat_glimpses": 1,
        "use_position": True,
        "size": "large",
    }
    assert large["schedule"]["milestones"] == [10, 12] and large["train"]["epochs"] == 2
    assert large["optim"]["betas"] == [0.8, 0.9] and large["optim"]["eps"] == 1e-9
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  nmae: adam\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.nmae'"):
        load_config(bad, task_defaults("vqa"))
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(bad, task_defaults("vqa"))
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, task_defaults("vqa"), ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", task_defaults("vqa"))
    # Detectron2's KEY VALUE pairs and key=value words, mixed
    mixed = load_config(
        CONFIGS / "mcan-small.yaml",
        task_defaults("vqa"),
        ["train.epochs", "4", "optim.lr=0.5", "optim.betas", "[0.1, 0.2]"],
    )
    assert mixed["train"]["epochs"] == 4 and mixed["optim"]["lr"] == 0.5
    assert mixed["optim"]["betas"] == [0.1, 0.2]
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config(None, task_defaults("vqa"), ["train.epoch", "2"])
    bad.write_text(f"_base_: {CONFIGS / 'mcan-small.yaml'}\n")
    with pytest.raises(ConfigError, match="the inheritance key is '_BASE_'"):
        load_config(bad, task_defaults("vqa"))


def test_every_shipped_config_loads_and_builds_its_model():
    from vqa.engine.commands import task_defaults
    from vqa.engine.config import load_config
    from vqa.models import build_captioner, build_vqa_model

    for name in ("pythia", "mcan-small", "mcan-large"):
        cfg = load_config(
            CONFIGS / f"{name}.yaml",
            task_defaults("vqa"),
            ["model.layers=1"] if name.startswith("mcan") else [],
        )
        model = build_vqa_model(cfg["model"], vocab_size=30, num_answers=9, feature_dim=16)
        assert sum(p.numel() for p in model.parameters()) > 0
    cfg = load_config(CONFIGS / "updown.yaml", task_defaults("caption"))
    assert build_captioner(cfg["model"], 30, 16, 1, 2).hidden == 1000


def test_metrics_log_drops_records_after_the_resumed_step(tmp_path):
    from gridfeats.engine import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3, 4):
        log.log("train", step, 0, loss=float(step))
    log.close()
    with open(tmp_path / "m.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # a line torn by a kill
    resumed = MetricsLog(tmp_path / "m.jsonl", resume_from_step=2)
    resumed.log("train", 3, 0, loss=30.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "m.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]


# --------------------------------------------------------------------------- DDP
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_ddp_matches_one_process_with_the_same_global_batch(tmp_path, synthetic):
    """Two gloo ranks with 32 questions each take the same steps as one process with 64.

    The resumable sampler gives rank r every other index of the epoch's permutation, so the two
    rank batches of a step together are exactly the single process's batch; with dropout off and
    a batch-mean loss, DDP's averaged gradients equal the single-process gradient.
    """
    config = write_config(
        tmp_path,
        synthetic,
        "mcan-small",
        "region",
        epochs=1,
        log_every_steps=1,
        eval_batch_size=256,
    )
    # SGD, not Adam: Adam rescales the numerically-zero gradients of softmax-invariant biases
    # (key-projection biases) into full-size steps of float noise.
    common = (
        "model.layers=1",
        "model.dropout=0.0",
        "loss.reduction=batch_mean",
        "optim.name=sgd",
        "optim.lr=0.05",
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop(KILL_ENV, None)
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "gridfeats",
            "vqa",
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "ddp"),
            *common,
            "train.batch_size=32",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "gridfeats",
            "vqa",
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "single"),
            *common,
            "train.batch_size=64",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    steps = [
        r["step"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["kind"] == "train"
    ]
    assert steps == [
        r["step"]
        for r in read_metrics(tmp_path / "single" / "metrics.jsonl")
        if r["kind"] == "train"
    ]
    a = load_checkpoint(tmp_path / "ddp" / FINAL)["model"]
    b = load_checkpoint(tmp_path / "single" / FINAL)["model"]
    assert set(a) == set(b) and not any(k.startswith("module.") for k in a)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name


# --------------------------------------------------------------------------- text options
def test_glove_file_initialises_the_question_embedding(tmp_path, synthetic):
    from vqa.engine.commands import task_defaults
    from vqa.engine.config import load_config
    from vqa.engine.vqa_task import VQATask

    glove = tmp_path / "glove.txt"
    glove.write_text("what 0.5 0.25 -1 2\ncolor 1 1 1 1\nzebra 9 9 9 9\n", encoding="utf-8")
    config = write_config(tmp_path, synthetic, "pythia", "region")
    cfg = load_config(
        config, task_defaults("vqa"), [f"data.word_vectors={glove}", "model.word_dim=4"]
    )
    task = VQATask(cfg)
    weight = task.model.question_encoder.embedding.weight
    vocab = task.question_vocab
    assert torch.equal(weight[vocab.stoi["what"]], torch.tensor([0.5, 0.25, -1.0, 2.0]))
    assert torch.equal(weight[vocab.stoi["color"]], torch.ones(4))
    assert torch.equal(weight[0], torch.zeros(4))  # padding
    bad = load_config(config, task_defaults("vqa"), [f"data.word_vectors={glove}"])
    with pytest.raises(ValueError, match="4-d vectors, but dim=32"):
        VQATask(bad)


def test_local_transformers_tokenizer_and_encoder_train_end_to_end(tmp_path, synthetic):
    transformers = pytest.importorskip("transformers")
    from vqa.data import WordVocab

    words = WordVocab.from_questions(synthetic["train_questions"]).itos[2:]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    model_dir = tmp_path / "tiny-bert"
    transformers.BertTokenizerFast(vocab_file=str(vocab_file)).save_pretrained(model_dir)
    config = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(model_dir)
    cfg_path = write_config(tmp_path, synthetic, "mcan-small", "region", epochs=1)
    out = tmp_path / "run"
    assert (
        gridfeats_main(
            [
                "vqa",
                "train",
                "--config",
                str(cfg_path),
                "--out",
                str(out),
                f"data.hf_tokenizer={model_dir}",
                f"model.text_encoder={model_dir}",
                "model.layers=1",
            ]
        )
        == 0
    )
    state = load_checkpoint(out / FINAL, kind="vqa")["model"]
    assert any(name.startswith("text_encoder.encoder.") for name in state)
    results = tmp_path / "results.json"
    assert (
        gridfeats_main(
            [
                "vqa",
                "predict",
                "--checkpoint",
                str(out),
                "--questions",
                str(synthetic["val_questions"]),
                "--out",
                str(results),
            ]
        )
        == 0
    )
    assert len(json.loads(results.read_text())) > 0
