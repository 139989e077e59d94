"""ResNet recipes: torchvision, MoCo v2, SimSiam (with and without DDP), MoCo v3 R-50 and DINO R-50
(training file and released backbone), written in their real layouts around one seeded torchvision
resnet50, converted by ``gridfeats convert-backbone``, and compared with the source model's own
layer4 through ``Detector.extract_grid``."""

from __future__ import annotations

import pytest
import torch

from gridfeats.checkpoint import read_checkpoint
from gridfeats.config import get_cfg

from . import layouts
from .helpers import (
    REAL_SIZES,
    SMALL_SIZES,
    convert,
    grid,
    grids_unresized,
    read_rgb,
    refusal,
    relative_error,
    write_pngs,
)
from .reference import resnet_layer4, seeded_resnet50, to_tensor_normalize

RESNET_LAYOUTS = {
    "torchvision": (layouts.write_torchvision, "torchvision", "all of it"),
    "moco_v2": (layouts.write_moco_v2, "moco", "query encoder 'encoder_q.'"),
    "simsiam": (layouts.write_simsiam, "simsiam", "encoder 'encoder.'"),
    "simsiam_no_ddp": (
        lambda s, p: layouts.write_simsiam(s, p, ddp=False),
        "simsiam",
        "encoder 'encoder.'",
    ),
    "mocov3": (layouts.write_mocov3_resnet, "mocov3", "base encoder 'base_encoder.'"),
    "dino_training": (layouts.write_dino_resnet, "dino", "teacher backbone 'backbone.'"),
    "dino_release": (layouts.write_dino_resnet_release, "torchvision", "all of it"),
}


@pytest.fixture(scope="module")
def resnet():
    return seeded_resnet50(seed=11)


@pytest.fixture(scope="module")
def converted_torchvision(resnet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tv")
    src = layouts.write_torchvision(resnet.state_dict(), folder / "resnet50.pth")
    dst = folder / "tv.pth"
    convert(src, dst)
    return dst


def _layer4(resnet, png):
    with torch.no_grad():
        return resnet_layer4(resnet, to_tensor_normalize(read_rgb(png)))[0]


def _backbone_config(dst):
    cfg = get_cfg(dst.with_suffix(".yaml"))
    return {
        "format": cfg.INPUT.FORMAT,
        "mean": list(cfg.MODEL.PIXEL_MEAN),
        "std": list(cfg.MODEL.PIXEL_STD),
        "resnets": dict(cfg.MODEL.RESNETS),
    }


def test_torchvision_config_is_rgb_imagenet_stride_in_3x3_frozen_bn(converted_torchvision):
    cfg = get_cfg(converted_torchvision.with_suffix(".yaml"))
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([123.675, 116.28, 103.53])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([58.395, 57.12, 57.375])
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.NUM_GROUPS == 1
    assert cfg.MODEL.WEIGHTS == str(converted_torchvision.resolve())
    # Grid config underneath: res5 stays in the backbone, RPN / box head read the dilated res5.
    assert cfg.MODEL.ROI_HEADS.NAME == "AttributeStandardROIHeads"
    state, _, extra = read_checkpoint(converted_torchvision)
    assert all(k.startswith("backbone.") for k in state) and len(state) == 265
    assert not any(k.endswith("num_batches_tracked") or ".fc." in k for k in state)
    assert extra["format"] == "torchvision"


def test_torchvision_grids_equal_layer4(resnet, converted_torchvision, tmp_path, one_thread):
    pngs = write_pngs(tmp_path, SMALL_SIZES)
    for png, got in zip(pngs, grids_unresized(converted_torchvision, pngs)):
        assert relative_error(got, _layer4(resnet, png)) < 1e-4


@pytest.mark.parametrize("name", [n for n in RESNET_LAYOUTS if n != "torchvision"])
def test_every_layout_gives_the_torchvision_tensors_and_config(
    name, resnet, converted_torchvision, tmp_path, capsys
):
    """Cheap form of the grid check for every layout: the converted tensors and backbone/input
    config are exactly those of the plain torchvision file (whose grids equal layer4, above)."""
    writer, fmt, branch = RESNET_LAYOUTS[name]
    src = writer(resnet.state_dict(), tmp_path / "source.pth.tar")
    dst = tmp_path / f"{name}.pth"
    out = convert(src, dst, capsys=capsys)
    assert f"-> format {fmt}\n" in out and f"branch: {branch}" in out
    got, _, _ = read_checkpoint(dst)
    want, _, _ = read_checkpoint(converted_torchvision)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert _backbone_config(dst) == _backbone_config(converted_torchvision)


def test_wrong_branch_would_differ(resnet, tmp_path):
    """The key encoder of the MoCo file holds other values: taking it could not pass the checks."""
    src = layouts.write_moco_v2(resnet.state_dict(), tmp_path / "moco.pth.tar")
    state = torch.load(src, weights_only=True)["state_dict"]
    q = state["module.encoder_q.layer4.2.conv3.weight"]
    assert not torch.equal(q, state["module.encoder_k.layer4.2.conv3.weight"])


def test_refusals_name_the_reason(resnet, tmp_path, capsys):
    state = resnet.state_dict()
    torch.save({"state_dict": {"module.queue": torch.zeros(4, 8)}}, tmp_path / "empty.pth")
    assert "no backbone" in refusal(tmp_path / "empty.pth", tmp_path / "a.pth", capsys=capsys)
    both = {f"module.encoder_q.{k}": v for k, v in list(state.items())[:3]}
    both.update({f"module.base_encoder.{k}": v for k, v in list(state.items())[:3]})
    torch.save({"state_dict": both}, tmp_path / "both.pth")
    err = refusal(tmp_path / "both.pth", tmp_path / "b.pth", capsys=capsys)
    assert "ambiguous" in err and "--format" in err
    bad = dict(state)
    bad["layer2.0.conv2.weight"] = torch.zeros(128, 128, 5, 5)
    torch.save(bad, tmp_path / "bad.pth")
    err = refusal(tmp_path / "bad.pth", tmp_path / "c.pth", capsys=capsys)
    assert "shape mismatch" in err and "res3.0.conv2.weight" in err
    err = refusal(tmp_path / "bad.pth", tmp_path / "d.pth", "--format", "mae", capsys=capsys)
    assert "torchvision-style ResNet" in err
    err = refusal(tmp_path / "bad.pth", tmp_path / "e.pth", "--num-heads", "6", capsys=capsys)
    assert "ViTs only" in err


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESNET_LAYOUTS))
def test_every_layout_grid_equals_layer4_at_real_sizes(name, resnet, tmp_path):
    """The acceptance check itself: per size, Detector(get_cfg(DST.yaml, sizes)).extract_grid."""
    writer = RESNET_LAYOUTS[name][0]
    src = writer(resnet.state_dict(), tmp_path / "source.pth.tar")
    dst = tmp_path / f"{name}.pth"
    convert(src, dst)
    for png in write_pngs(tmp_path, REAL_SIZES):
        assert relative_error(grid(dst, png), _layer4(resnet, png)) < 1e-4
