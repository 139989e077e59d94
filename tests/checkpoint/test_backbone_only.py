"""``load_checkpoint(required="backbone")`` and ``check_complete``: a backbone-only checkpoint is
enough for grids, is named as such when heads are needed, and a file matching nothing is refused
even with ``allow_partial``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gridfeats.checkpoint import CheckpointError, check_complete, load_checkpoint


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.roi_heads = nn.Module()
        self.roi_heads.res5 = nn.Linear(2, 2)  # a C4 head's res5 is backbone weights
        self.roi_heads.box_predictor = nn.Linear(2, 3)


def _save(path, keys):
    state = {k: v for k, v in _Model().state_dict().items() if k.startswith(keys)}
    torch.save({"model": state}, path)
    return path


def test_backbone_only_is_enough_when_only_the_backbone_is_required(tmp_path):
    path = _save(tmp_path / "bb.pth", ("backbone.", "roi_heads.res5."))
    with pytest.raises(CheckpointError, match="only backbone tensors"):
        load_checkpoint(_Model(), path)
    report, _ = load_checkpoint(_Model(), path, required="backbone")
    assert report.backbone_only and report.backbone_complete and not report.complete
    assert report.missing == ["roi_heads.box_predictor.weight", "roi_heads.box_predictor.bias"]
    with pytest.raises(CheckpointError, match="only backbone tensors"):
        check_complete(report)
    check_complete(report, allow_partial=True)


def test_an_incomplete_backbone_is_refused_even_for_grids(tmp_path):
    path = _save(tmp_path / "half.pth", ("backbone.",))
    with pytest.raises(CheckpointError, match="(?s)incomplete checkpoint.*roi_heads.res5.weight"):
        load_checkpoint(_Model(), path, required="backbone")


def test_a_checkpoint_matching_nothing_is_refused_even_with_allow_partial(tmp_path):
    torch.save({"module.encoder_q.fc.weight": torch.zeros(2, 2)}, tmp_path / "raw.pth")
    with pytest.raises(
        CheckpointError, match="(?s)no tensor of the checkpoint matches.*convert-backbone"
    ):
        load_checkpoint(_Model(), tmp_path / "raw.pth", allow_partial=True)
    with pytest.raises(ValueError, match="required"):
        check_complete(load_checkpoint(_Model(), _save(tmp_path / "f.pth", ("",)))[0], "heads")
