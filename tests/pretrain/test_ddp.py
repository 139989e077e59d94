"""2 torchrun CPU ranks (gloo) = one process with the same global batch, where the method allows it.

On CPU torch has no SyncBatchNorm, so only BN-free methods can match exactly: DINO with a ViT
(no BN in its head by default) and stochastic depth off (its per-sample masks are drawn per rank),
here with SGD so float32 rounding of the gradient average stays rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gridfeats.data.synthetic_classes import make_classification

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_cpu_ranks_equal_one_process_for_dino_vit(tmp_path):
    paths = make_classification(tmp_path, per_class=2, size=32)  # 9 train images
    common = [
        "pretrain",
        "dino",
        "--data",
        paths["train"],
        "--arch",
        "vit_tiny",
        "--crop-size",
        "32",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--local-crops",
        "2",
        "--monitor-images",
        "8",
        "--device",
        "cpu",
        "optimizer=sgd",
        "drop_path_rate=0.0",
        "out_dim=64",
        "patch_size=8",
        "num_heads=3",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, "-m", "gridfeats", *map(str, common), "--out", tmp_path / "one"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29731",
            "-m",
            "gridfeats",
            *map(str, common),
            "--out",
            tmp_path / "two",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)["method_state"]
    b = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=True)["method_state"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())

    def losses(run):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in rows if '"loss"' in x]

    assert len(losses("one")) == 2  # 9 images, global batch 4: two steps
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
