"""One training iteration against real Detectron2 + grid-feats-vqa (``../shared/fixtures/d2train``).

The fixture's own ``make_candidate.py`` drives the public API (``build_model(cfg, weights=...)``,
``model(batch)`` with the reference proposals injected, ``build_optimizer``, ``build_lr_scheduler``)
on the seeded R-50-grid weights of ``d2parity/make_weights.py``, and its ``compare_train.py``
checks the five losses (rel 1e-4), the gradients (1e-3 of their largest entry), one SGD step
(weight-decay-only entries to 1 ulp) and the LR schedule (rel 1e-9), for the sampling-free regime
A and for default sampling after ``torch.manual_seed(0)`` (regime B: the same ``randperm`` draws).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parity import d2parity

#: ``GRIDFEATS_D2TRAIN`` may point elsewhere; by default it sits next to the d2parity fixtures
D2TRAIN = Path(os.environ.get("GRIDFEATS_D2TRAIN", d2parity.FIXTURES.parent / "d2train"))

if not (D2TRAIN / "make_candidate.py").is_file() or not d2parity.available():
    if os.environ.get("CI"):
        raise RuntimeError(f"Detectron2 training fixtures missing at {D2TRAIN}")
    pytest.skip(f"d2train fixtures not found at {D2TRAIN}", allow_module_level=True)

REPO = d2parity.REPO


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The seeded R-50-grid checkpoint of ``d2parity/make_weights.py``, written once."""
    return d2parity.weights_path("R-50-grid", tmp_path_factory.mktemp("d2train"))


def test_one_training_iteration_matches_detectron2(tmp_path, weights):
    candidate = tmp_path / "cand.npz"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    made = subprocess.run(
        [sys.executable, str(D2TRAIN / "make_candidate.py"), str(D2TRAIN), str(weights),
         str(candidate), "A,B"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    compared = subprocess.run(
        [sys.executable, str(D2TRAIN / "compare_train.py"), str(D2TRAIN / "expected.npz"),
         str(candidate), "--regimes", "A,B", "--strict"],
        capture_output=True, text=True,
    )  # fmt: skip
    report = compared.stdout
    assert compared.returncode == 0, report[-6000:] + compared.stderr[-2000:]
    summary = report.strip().splitlines()[-1]
    assert summary.startswith("summary:") and " 0 FAIL" in summary, summary
    # every required item was supplied and checked (nothing skipped), both regimes, the schedule
    for item in ("A/loss/total", "B/loss/total", "A/gradnorm_total", "B/gradnorm_total"):
        assert any(line.startswith("PASS") and item in line for line in report.splitlines()), item
    assert any(line.startswith("PASS") and "lr_schedule/lr" in line for line in report.splitlines())
    assert any(line.startswith("PASS") and "A/sgd_iter0/" in line for line in report.splitlines())


def _fixture_batch(np, torch):
    inp = np.load(D2TRAIN / "inputs.npz")
    exp = np.load(D2TRAIN / "expected.npz")
    return [
        {
            "image": torch.from_numpy(inp[f"image{i}_bgr"].copy()),
            "instances": {
                k: torch.from_numpy(inp[f"gt{i}_{k[3:]}"].copy())
                for k in ("gt_boxes", "gt_classes", "gt_attributes")
            },
            "proposals": {
                "proposal_boxes": torch.from_numpy(exp[f"proposals/img{i}/boxes"].copy()),
                "objectness_logits": torch.from_numpy(exp[f"proposals/img{i}/logits"].copy()),
            },
        }
        for i in range(2)
    ]


def test_seeded_sampling_draws_and_training_proposals_match_detectron2(
    tmp_path, monkeypatch, weights
):
    """Regime B's 4 ``subsample_labels`` results (8 ``randperm`` draws) index for index (RPN
    image 0, 1, then ROI image 0, 1), the labels of the 512 sampled proposals per image in order,
    and the model's own training-mode proposals (top 12000 -> NMS 0.7 -> top 2000) as sets
    within 0.01 px."""
    import json

    import numpy as np
    import torch

    import gridfeats
    import gridfeats.modeling.roi_heads.roi_heads as roi_module
    import gridfeats.modeling.rpn as rpn_module

    draws = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            draws.append(out)
            return out

        return wrapper

    monkeypatch.setattr(rpn_module, "subsample_labels", recording(rpn_module.subsample_labels))
    monkeypatch.setattr(roi_module, "subsample_labels", recording(roi_module.subsample_labels))
    meta = json.loads((D2TRAIN / "expected.json").read_text())
    cfg = gridfeats.get_cfg("R-50-grid", opts=list(meta["regimes"]["B"]))
    model = gridfeats.build_model(cfg, weights=weights)
    seen = {}
    model.proposal_generator.register_forward_hook(lambda m, i, o: seen.update(rpn=o[0]))
    model.roi_heads.register_forward_hook(lambda m, i, o: seen.update(roi=o[0]))
    torch.manual_seed(0)
    with torch.no_grad():
        losses = model(_fixture_batch(np, torch))
    cand = {f"B/loss/{k}": np.float64(v.item()) for k, v in losses.items()}
    cand["B/loss/total"] = np.float64(sum(v.item() for v in losses.values()))
    for j, (pos, neg) in enumerate(draws):
        cand[f"B/subsample/{j}/pos_idx"], cand[f"B/subsample/{j}/neg_idx"] = (
            pos.numpy(),
            neg.numpy(),
        )
    for i in range(2):
        cand[f"B/sampled/img{i}/gt_classes"] = seen["roi"][i].gt_classes.numpy()
        cand[f"own_proposals/img{i}/boxes"] = seen["rpn"][i].proposal_boxes.numpy()
    path = tmp_path / "draws.npz"
    np.savez(path, **cand)
    compared = subprocess.run(
        [sys.executable, str(D2TRAIN / "compare_train.py"), str(D2TRAIN / "expected.npz"),
         str(path), "--regimes", "B"],
        capture_output=True, text=True,
    )  # fmt: skip
    report = compared.stdout
    assert compared.returncode == 0, report[-6000:] + compared.stderr[-2000:]
    passed = [line.split()[1] for line in report.splitlines() if line.startswith("PASS")]
    assert len(draws) == 4
    for j in range(4):
        assert f"B/subsample/{j}/pos_idx" in passed and f"B/subsample/{j}/neg_idx" in passed
    assert {"B/sampled/img0/gt_classes", "own_proposals/img0/boxes"} <= set(passed)
    assert {"B/sampled/img1/gt_classes", "own_proposals/img1/boxes"} <= set(passed)
