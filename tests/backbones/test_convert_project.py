"""This project's own files: gridfeats-pretrain checkpoints (``{"model", "arch", "method",
"config"}``, docs/backbones.md), Detectron2 model files and Caffe2 ``.pkl`` files (as today)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from gridfeats import Detector
from gridfeats.checkpoint import read_checkpoint
from gridfeats.config import get_cfg
from gridfeats.modeling.backbone.vit import VisionTransformer

from .helpers import SMALL_SIZES, convert, grids_unresized, refusal, relative_error, write_pngs

RGB_IMAGENET = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}


def test_pretrain_vit_uses_recorded_heads_and_rule(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    vit = VisionTransformer(embed_dim=48, depth=2, num_heads=6, pos_interp="dino").eval()
    torch.save(
        {
            "model": vit.state_dict(),
            "arch": "vit_small",
            "method": "dino",
            "epoch": 3,
            "config": {"MODEL.VIT.NUM_HEADS": 6, "MODEL.VIT.POS_INTERP": "dino"},
        },
        tmp_path / "pretrain.pth",
    )
    out = convert(tmp_path / "pretrain.pth", tmp_path / "vit.pth", capsys=capsys)
    assert "-> format gridfeats-pretrain" in out
    v = get_cfg(tmp_path / "vit.yaml").MODEL.VIT
    assert (v.NUM_HEADS, v.POS_INTERP, v.POS_EMBED) == (6, "dino", "learned")
    pngs = write_pngs(tmp_path, [(48, 80)])
    det = Detector(
        get_cfg(tmp_path / "vit.yaml", opts=["INPUT.MIN_SIZE_TEST", 0]),
        weights=tmp_path / "vit.pth",
        allow_partial=True,
    )
    image = det.prepare(pngs[0]).image.float()
    x = ((image - det.model.pixel_mean.cpu()) / det.model.pixel_std.cpu()).unsqueeze(0)
    with torch.no_grad():
        want = vit(x)["last_feat"][0]
    assert relative_error(det.extract_grid(pngs[0]), want) < 1e-5


def test_pretrain_vit_without_recorded_heads_refuses(tmp_path, capsys):
    vit = VisionTransformer(embed_dim=48, depth=1, num_heads=6)
    torch.save({"model": vit.state_dict(), "arch": "vit", "method": "mae"}, tmp_path / "p.pth")
    assert "--num-heads" in refusal(tmp_path / "p.pth", tmp_path / "o.pth", capsys=capsys)


@pytest.fixture(scope="module")
def detector_r50():
    torch.manual_seed(0)
    return Detector(get_cfg("R-50-grid", opts=["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", 0]))


def test_pretrain_resnet_keeps_recorded_input_settings(detector_r50, tmp_path, capsys):
    backbone = detector_r50.model.backbone.state_dict()
    torch.save(
        {
            "model": {f"backbone.{k}": v for k, v in backbone.items()},
            "arch": "R-50",
            "method": "simsiam",
            "config": RGB_IMAGENET,
        },
        tmp_path / "pretrain.pth",
    )
    convert(tmp_path / "pretrain.pth", tmp_path / "r50.pth", capsys=capsys)
    cfg = get_cfg(tmp_path / "r50.yaml")
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    state, _, _ = read_checkpoint(tmp_path / "r50.pth")
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in backbone.items())


def _caffe2_name(key: str) -> str:
    """Project ResNet name -> MSRA Caffe2 blob name (the inverse of the loader's renaming)."""
    key = key.replace("stem.conv1.norm.", "res_conv1_bn.").replace("stem.conv1.", "conv1.")
    for new, old in (
        ("shortcut", "branch1"),
        ("conv1", "branch2a"),
        ("conv2", "branch2b"),
        ("conv3", "branch2c"),
    ):
        key = key.replace(f".{new}.", f".{old}.")
    key = key.replace(".norm.", "_bn.")
    key = key.replace("weight", "s" if "_bn." in key else "w")
    return key.replace("bias", "b").replace(".", "_")


def test_detectron2_and_caffe2_files_give_the_same_grids(detector_r50, tmp_path, one_thread):
    full = detector_r50.model.state_dict()
    torch.save({"model": full, "iteration": 10}, tmp_path / "model_final.pth")
    convert(tmp_path / "model_final.pth", tmp_path / "d2.pth")
    state, _, _ = read_checkpoint(tmp_path / "d2.pth")
    assert sorted(state) == sorted(k for k in full if k.startswith("backbone."))
    cfg = get_cfg(tmp_path / "d2.yaml")
    assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is True  # --base kept
    pngs = write_pngs(tmp_path, SMALL_SIZES[:2])
    want = [g for g in detector_r50.extract_grid(list(pngs))]
    for got, ref in zip(grids_unresized(tmp_path / "d2.pth", pngs), want):
        assert relative_error(got, ref) < 1e-6

    backbone = detector_r50.model.backbone.state_dict()
    blobs = {_caffe2_name(k): v.numpy() for k, v in backbone.items() if "running" not in k}
    blobs["fc1000_w"] = np.zeros((1000, 2048), np.float32)
    assert "res2_0_branch2a_w" in blobs and "res_conv1_bn_s" in blobs
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    convert(tmp_path / "R-50.pkl", tmp_path / "msra.pth")
    state, _, _ = read_checkpoint(tmp_path / "msra.pth")
    assert torch.equal(state["backbone.res4.5.conv3.weight"], backbone["res4.5.conv3.weight"])
    assert torch.equal(state["backbone.res2.0.conv1.norm.running_var"], torch.ones(64))


def test_the_pretraining_runs_own_checkpoint_converts(tmp_path, capsys):
    """The contract with gridfeats.pretrain: its RUN_DIR/backbone.pth converts as written."""
    pretrain = pytest.importorskip("gridfeats.pretrain")
    from gridfeats.pretrain.train import BACKBONE, backbone_tensors, export_backbone

    torch.manual_seed(0)
    method = pretrain.build_method("dino", arch="vit_tiny")
    export_backbone(tmp_path / BACKBONE, method, epoch=0, step=0)
    out = convert(tmp_path / BACKBONE, tmp_path / "dino.pth", capsys=capsys)
    assert "-> format gridfeats-pretrain" in out
    v = get_cfg(tmp_path / "dino.yaml").MODEL.VIT
    assert (v.EMBED_DIM, v.NUM_HEADS, v.POS_INTERP) == (192, 3, "dino")
    state, _, _ = read_checkpoint(tmp_path / "dino.pth")
    want = backbone_tensors(method)
    assert sorted(state) == sorted(f"backbone.{k}" for k in want)
    assert all(torch.equal(state[f"backbone.{k}"], t) for k, t in want.items())
