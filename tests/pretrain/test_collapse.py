"""SimSiam's stop-gradient ablation seen by the collapse monitor (output_std * sqrt(d)).

With stop-gradient the score stays near 1 while the loss falls; without it the outputs concentrate
and the score drifts down (paper Fig. 2). The default test shows it in 8 steps at a high lr on
fixed views; the slow one runs the CLI on 108 synthetic shape images for 12 epochs (36 steps).
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from gridfeats.data.image_io import read_image
from gridfeats.data.synthetic_classes import make_classification
from gridfeats.extract.sources import list_images
from gridfeats.pretrain import build_method
from gridfeats.pretrain.augment import views_transform
from gridfeats.pretrain.monitors import collapse_score, output_std


def _score(m, images):
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    with torch.no_grad():
        z = m.monitor_output(images)
        for k, v in m.named_buffers():
            v.copy_(buffers[k])
    return collapse_score(output_std(z), z.shape[1])


def test_without_stop_gradient_the_monitor_falls_and_with_it_stays(tmp_path, one_thread):
    paths = make_classification(tmp_path, per_class=5, size=40)
    imgs = [
        torch.from_numpy(read_image(i.path).copy()).permute(2, 0, 1)
        for i in list_images(str(paths["train"]))
    ][:32]
    tf = views_transform("simsiam", 24)
    torch.manual_seed(0)
    batches = []
    for _ in range(4):
        pairs = [tf(im) for im in imgs]
        batches.append([torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])])
    probe = torch.stack([tf(im)[0] for im in imgs])
    result = {}
    for stop_grad in (True, False):
        torch.manual_seed(0)
        m = build_method(
            "simsiam", arch="resnet18", dim=64, pred_dim=16, lr=0.3, stop_grad=stop_grad
        )
        start = _score(m, probe)
        losses = [m.train_step(batches[i % 4]) for i in range(8)]
        result[stop_grad] = (start, _score(m, probe), losses)
    (s0, s1, loss_sg), (n0, n1, loss_nosg) = result[True], result[False]
    assert s0 > 0.95 and n0 > 0.95  # both start spread out
    assert s1 >= 0.95, s1
    assert n1 < 0.9 and n1 < s1 - 0.08, (n1, s1)
    assert loss_nosg[-1] < loss_nosg[0] - 0.2  # racing toward -1 while collapsing
    assert loss_sg[-1] < loss_sg[0]


@pytest.mark.slow
def test_simsiam_ablation_over_epochs_on_synthetic_shapes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    paths = make_classification(tmp_path, per_class=16, size=48)  # 108 train images
    runs = {}
    for name, extra in (("sg", []), ("nosg", ["--no-stop-grad"])):
        out = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "gridfeats",
            "pretrain",
            "simsiam",
            "--data",
            paths["train"],
            "--out",
            out,
            "--arch",
            "resnet18",
            "--epochs",
            12,
            "--batch-size",
            32,
            "--crop-size",
            32,
            "--monitor-images",
            64,
            "--lr",
            0.5,
            "dim=128",
            "pred_dim=32",
            *extra,
        ]
        res = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        assert res.returncode == 0, res.stderr[-2000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        scores = [r["output_std"] * math.sqrt(r["output_dim"]) for r in rows if "output_std" in r]
        by_epoch = {}
        for r in rows:
            if "loss" in r:
                by_epoch.setdefault(r["epoch"], []).append(r["loss"])
        losses = [statistics.mean(v) for _, v in sorted(by_epoch.items())]
        runs[name] = (scores, losses, res.stderr)
    scores, losses, _ = runs["sg"]
    assert min(scores) >= 0.9 and losses[-1] < losses[0]
    scores, losses, stderr = runs["nosg"]
    assert scores[-1] < 0.85 and losses[-1] < losses[0]
    assert "collapse monitor" in stderr
