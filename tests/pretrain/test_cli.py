"""``gridfeats pretrain``: metrics, monitors, curves, checkpoint layouts, bad images, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gridfeats.data.synthetic_classes import make_classification
from gridfeats.engine import KILL_ENV, load_training_state
from gridfeats.pretrain import build_method

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--arch",
    "resnet18",
    "--crop-size",
    "32",
    "--batch-size",
    "8",
    "--monitor-images",
    "16",
    "dim=32",
]


def _cmd(*args):
    return [sys.executable, "-m", "gridfeats", "pretrain", *map(str, args)]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    paths = make_classification(root, per_class=4, size=40)  # 9 classes: 27 train, 9 val
    (paths["train"] / "circle_red" / "broken.png").write_bytes(b"not an image")
    return paths


def _main(*args) -> int:
    from gridfeats.cli import main

    return main(["pretrain", *map(str, args)])


def test_run_writes_monitors_curves_and_both_checkpoint_layouts(data, tmp_path, one_thread):
    out = tmp_path / "run"
    assert (
        _main(
            "simsiam",
            "--data",
            data["train"],
            "--out",
            out,
            "--epochs",
            2,
            *TINY,
            "--knn-train",
            data["train"],
            "--knn-val",
            data["val"],
            "--export-layout",
            "upstream",
            "pred_dim=8",
        )
        == 0
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    monitors = [r for r in rows if "output_std" in r]
    steps = [r for r in rows if "loss" in r]
    assert [(r["epoch"], r["step"]) for r in monitors] == [(0, 0), (1, 3), (2, 6)]
    assert all(0.0 <= r["knn_top1"] <= 1.0 and r["output_dim"] == 32 for r in monitors)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # 28 images incl. 1 bad -> 3 batches
    assert all({"epoch", "step", "loss", "lr"} <= set(r) for r in steps)
    bad = [json.loads(x) for x in (out / "bad_images.jsonl").read_text().splitlines()]
    assert {b["image_id"] for b in bad} == {"circle_red/broken.png"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "backbone.pth", weights_only=True)  # convert-backbone's input
    assert ckpt["format"] == "gridfeats-pretrain" and ckpt["method"] == "simsiam"
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6)
    assert "stem.conv1.weight" in ckpt["model"] and "res5.1.conv2.norm.running_var" in ckpt["model"]
    assert not any(k.startswith("fc.") for k in ckpt["model"])
    state = load_training_state(out / "last.pt")  # the engine's training state: the whole method
    assert state["method"] == "simsiam" and state["position"] == {
        "iteration": 6,
        "epoch": 2,
        "batch": 0,
    }
    assert torch.equal(
        state["model"]["model.encoder.conv1.weight"], ckpt["model"]["stem.conv1.weight"]
    )
    assert "model.predictor.0.weight" in state["model"]
    upstream = torch.load(out / "upstream_checkpoint.pth", weights_only=True)
    assert "module.encoder.fc.6.weight" in upstream["state_dict"]
    m = build_method("simsiam", checkpoint=upstream)
    assert torch.equal(m.model.encoder.conv1.weight, ckpt["model"]["stem.conv1.weight"])


def _rows(run: Path):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _same_runs(ref: Path, other: Path) -> None:
    """Bit-identical method state (online and momentum nets, queue), optimizer state, export
    and metrics (wall-clock times aside)."""
    a, b = load_training_state(ref / "last.pt"), load_training_state(other / "last.pt")
    assert a["position"] == b["position"]
    assert a["model"].keys() == b["model"].keys() and "model.queue" in a["model"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    ea = torch.load(ref / "backbone.pth", weights_only=True)["model"]
    eb = torch.load(other / "backbone.pth", weights_only=True)["model"]
    assert all(torch.equal(v, eb[k]) for k, v in ea.items())
    assert _rows(ref) == _rows(other)


def test_interrupted_run_resumes_to_identical_weights_in_process(
    data, tmp_path, monkeypatch, one_thread
):
    """Cheap form of the kill -9 test below: the run dies (an exception) after step 3."""
    from gridfeats.pretrain.mocov2 import MoCoV2

    args = ["--data", data["train"], "--epochs", 2, *TINY, "queue_size=16"]
    # The reference checkpoints only at epoch ends (saving never changes the run); the cut run
    # checkpoints every step so that it dies with a mid-epoch checkpoint.
    assert _main("mocov2", "--out", tmp_path / "ref", *args) == 0
    args += ["--ckpt-every", 1]
    real, calls = MoCoV2.train_step, []

    def dying(self, views, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, views, **kw)

    monkeypatch.setattr(MoCoV2, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        _main("mocov2", "--out", tmp_path / "cut", *args)
    monkeypatch.setattr(MoCoV2, "train_step", real)
    # 3 train_steps done; a batch that held the broken image is skipped by MoCo v2 (its queue
    # takes whole batches) but still counts as a step of the data position
    cut = load_training_state(tmp_path / "cut" / "last.pt")["iteration"]
    assert 3 <= cut < 6
    assert _main("mocov2", "--out", tmp_path / "cut", *args, "--resume") == 0
    _same_runs(tmp_path / "ref", tmp_path / "cut")


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_bit_identical_weights(data, tmp_path):
    args = ["--data", data["train"], "--epochs", 2, *TINY]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert (
        subprocess.run(
            _cmd("mocov2", "--out", ref, *args, "queue_size=16"),  # epoch-end checkpoints only
            env=_env(),
            capture_output=True,
            timeout=600,
        ).returncode
        == 0
    )
    # The engine SIGKILLs the process itself right after step 4 (batch 1 of epoch 1's 3): a real
    # kill -9 mid-epoch, at a known point instead of a polled one.
    args += ["--ckpt-every", 1]
    proc = subprocess.run(
        _cmd("mocov2", "--out", killed, *args, "queue_size=16"),
        env=dict(_env(), **{KILL_ENV: "4"}),
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL
    done = load_training_state(killed / "last.pt")
    assert done["position"] == {"iteration": 4, "epoch": 1, "batch": 1}  # mid-epoch
    assert not (killed / "curves.png").exists()
    res = subprocess.run(
        _cmd("mocov2", "--out", killed, *args, "--resume", "queue_size=16"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    _same_runs(ref, killed)
