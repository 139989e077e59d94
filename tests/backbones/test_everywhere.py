"""A converted backbone used like any other checkpoint: ``Detector`` takes a backbone-only file
for grids without ``allow_partial`` and refuses it for detections (unless allowed), the ViT
feeds the RPN and the grid config's box head, and ``gridfeats extract`` writes its grids."""

from __future__ import annotations

import pytest
import torch

from gridfeats import Detector
from gridfeats.checkpoint import CheckpointError
from gridfeats.cli import main as gridfeats_main
from gridfeats.config import get_cfg

from ..extract.helpers import read_all
from . import layouts
from .helpers import convert, write_pngs
from .reference import RefViT


@pytest.fixture(scope="module")
def converted_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    ref = RefViT(seed=7, dim=48, depth=2, heads=6, table="learned")
    src = layouts.write_dino_vit(ref.state_dict(), folder / "checkpoint.pth")
    convert(src, folder / "dino.pth")
    return folder / "dino.pth"


def _cfg(dst, *opts):
    return get_cfg(dst.with_suffix(".yaml"), opts=["INPUT.MIN_SIZE_TEST", 0, *opts])


def test_backbone_only_checkpoint_serves_grids_and_refuses_detections(converted_vit, tmp_path):
    png = write_pngs(tmp_path, [(64, 96)])[0]
    det = Detector(_cfg(converted_vit), weights=converted_vit)
    assert det.load_report.backbone_only and not det.load_report.complete
    assert det.extract_grid(png).shape == (48, 4, 6)
    with pytest.raises(CheckpointError, match="only backbone tensors.*allow_partial"):
        det.detect(png)
    with pytest.raises(CheckpointError, match="only backbone tensors"):
        det.region_candidates([det.prepare(png)])


def test_vit_is_a_detector_backbone_on_its_stride_16_map(converted_vit, tmp_path):
    """With randomly initialised heads (allow_partial), the RPN and the 1x1-pooled box head run
    on the ViT map: boxes inside the image, features of the box head's width."""
    png = write_pngs(tmp_path, [(64, 96)])[0]
    small = [
        "MODEL.ROI_HEADS.NUM_CLASSES",
        3,
        "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES",
        4,
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        50,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        0.0,
    ]
    cfg = _cfg(converted_vit, *small)
    det = Detector(cfg, weights=converted_vit, allow_partial=True)
    assert det.model.backbone.output_shape()["last_feat"].stride == 16
    out = det.detect(png)
    assert len(out["boxes"]) > 0 and out["features"].shape[1] == cfg.MODEL.ROI_BOX_HEAD.FC_DIM
    assert (out["boxes"][:, 2] <= 96).all() and (out["boxes"][:, 3] <= 64).all()


def test_vit_backbone_trains_with_drop_path(converted_vit):
    cfg = _cfg(converted_vit, "MODEL.VIT.DROP_PATH_RATE", 0.2)
    det = Detector(cfg, weights=converted_vit)
    backbone = det.model.backbone.train()
    for p in backbone.parameters():
        p.requires_grad_(True)
    x = torch.randn(2, 3, 32, 48)
    backbone(x)["last_feat"].square().mean().backward()
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert backbone.blocks[1].drop_path_rate == pytest.approx(0.2)


def test_gridfeats_extract_writes_the_converted_backbones_grids(converted_vit, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pngs = write_pngs(images, [(64, 96), (48, 64)])
    code = gridfeats_main(
        [
            "extract",
            "--config",
            str(converted_vit.with_suffix(".yaml")),
            "--weights",
            str(converted_vit),
            "--input",
            str(images),
            "--output",
            str(tmp_path / "grids.h5"),
            "--mode",
            "grid",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--no-progress",
            "INPUT.MIN_SIZE_TEST",
            "0",
        ]
    )
    assert code == 0
    rows = read_all(str(tmp_path / "grids.h5"))
    assert rows["errors/"] == {}
    det = Detector(_cfg(converted_vit), weights=converted_vit)
    for png in pngs:
        (stored,) = [v for k, v in rows.items() if png.stem in k]
        want = det.extract_grid(png)
        assert tuple(stored["grid_hw"]) == tuple(want.shape[1:])
        got = torch.as_tensor(stored["features"]).float()  # one row per cell, row-major
        assert torch.allclose(got, want.flatten(1).T, atol=1e-5)
