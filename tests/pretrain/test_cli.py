"""``gridfeats pretrain``: metrics, monitors, curves, checkpoint layouts, bad images, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gridfeats.data.synthetic_classes import make_classification
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
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["format"] == "gridfeats-pretrain" and ckpt["method"] == "simsiam"
    assert "stem.conv1.weight" in ckpt["model"] and "res5.1.conv2.norm.running_var" in ckpt["model"]
    assert not any(k.startswith("fc.") for k in ckpt["model"])
    upstream = torch.load(out / "upstream_checkpoint.pth", weights_only=True)
    assert "module.encoder.fc.6.weight" in upstream["state_dict"]
    m = build_method("simsiam", checkpoint=upstream)
    assert torch.equal(m.model.encoder.conv1.weight, ckpt["model"]["stem.conv1.weight"])


def _same_runs(ref: Path, other: Path) -> None:
    a = torch.load(ref / "checkpoint.pth", weights_only=True)
    b = torch.load(other / "checkpoint.pth", weights_only=True)
    assert a["method_state"].keys() == b["method_state"].keys()
    for k, v in a["method_state"].items():
        assert torch.equal(v, b["method_state"][k]), k
    ra = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (other / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb


def test_interrupted_run_resumes_to_identical_weights_in_process(
    data, tmp_path, monkeypatch, one_thread
):
    """Cheap form of the kill -9 test below: the run dies (an exception) after step 3."""
    from gridfeats.pretrain.mocov2 import MoCoV2

    args = ["--data", data["train"], "--epochs", 2, "--ckpt-every", 1, *TINY, "queue_size=16"]
    assert _main("mocov2", "--out", tmp_path / "ref", *args) == 0
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
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["step"] == 3
    assert _main("mocov2", "--out", tmp_path / "cut", *args, "--resume") == 0
    _same_runs(tmp_path / "ref", tmp_path / "cut")


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_bit_identical_weights(data, tmp_path):
    args = ["--data", data["train"], "--epochs", 2, "--ckpt-every", 1, *TINY]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert (
        subprocess.run(
            _cmd("mocov2", "--out", ref, *args, "queue_size=16"),
            env=_env(),
            capture_output=True,
            timeout=600,
        ).returncode
        == 0
    )
    proc = subprocess.Popen(
        _cmd("mocov2", "--out", killed, *args, "queue_size=16"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert (done["epoch"], done["epoch_batch"]) != (2, 0)  # killed before the end
    res = subprocess.run(
        _cmd("mocov2", "--out", killed, *args, "--resume", "queue_size=16"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    _same_runs(ref, killed)
