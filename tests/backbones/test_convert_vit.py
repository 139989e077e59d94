"""ViT recipes: MoCo v3 (training file), MAE (pretraining file and released encoder), DINO
(training file and released backbone), written around seeded reference ViTs, converted by
``gridfeats convert-backbone``, and compared with the reference's final-norm patch tokens through
``Detector.extract_grid`` at the acceptance check's sizes (square and non-square), each source
with its own position rule. Widths are tiny; the converter reads every dimension from the file."""

from __future__ import annotations

import pytest
import torch

from gridfeats.checkpoint import read_checkpoint
from gridfeats.config import get_cfg

from . import layouts
from .helpers import (
    REAL_SIZES,
    convert,
    grid,
    grids_unresized,
    read_rgb,
    refusal,
    relative_error,
    write_pngs,
)
from .reference import RefViT
from .reference import to_tensor_normalize as to_input

DIM, DEPTH = 48, 2

# name: (table, heads, writer, extra CLI flags, format, rule, branch words)
VIT_LAYOUTS = {
    "mocov3": ("mocov3", 12, layouts.write_mocov3_vit, (), "mocov3", "bicubic", "base encoder"),
    "mae_pretrain": ("mae", 12, layouts.write_mae_pretrain, (), "mae", "bicubic", "the encoder"),
    "mae_release": (
        "mae",
        12,
        layouts.write_mae_release,
        ("--num-heads", "12"),
        "mae",
        "bicubic",
        "the encoder",
    ),
    "dino_training": ("learned", 6, layouts.write_dino_vit, (), "dino", "dino", "teacher backbone"),
    "dino_release": (
        "learned",
        6,
        layouts.write_dino_vit_release,
        ("--num-heads", "6"),
        "dino",
        "dino",
        "the encoder",
    ),
}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_pngs(tmp_path_factory.mktemp("png"), REAL_SIZES)


def _reference(name: str) -> RefViT:
    table, heads = VIT_LAYOUTS[name][:2]
    return RefViT(seed=5, dim=DIM, depth=DEPTH, heads=heads, table=table)


@pytest.mark.parametrize("name", list(VIT_LAYOUTS))
def test_vit_layout_grids_equal_the_sources_patch_tokens(name, pngs, tmp_path, capsys, one_thread):
    table, heads, writer, flags, fmt, rule, branch = VIT_LAYOUTS[name]
    ref = _reference(name)
    src = writer(ref.state_dict(), tmp_path / "source.pth")
    dst = tmp_path / f"{name}.pth"
    out = convert(src, dst, *flags, capsys=capsys)
    assert f"-> format {fmt}\n" in out and branch in out
    cfg = get_cfg(dst.with_suffix(".yaml"))
    v = cfg.MODEL.VIT
    assert (v.PATCH_SIZE, v.EMBED_DIM, v.DEPTH, v.NUM_HEADS) == (16, DIM, DEPTH, heads)
    assert (v.LN_EPS, v.QKV_BIAS, v.MLP_RATIO, v.PRETRAIN_GRID) == (1e-6, True, 4.0, 14)
    kind = {"mocov3": "sincos-rows-first", "mae": "sincos-cols-first"}.get(table, "learned")
    assert (v.POS_EMBED, v.POS_INTERP) == (kind, rule)
    assert cfg.MODEL.BACKBONE.NAME == "build_vit_backbone" and cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.RPN.IN_FEATURES) == list(cfg.MODEL.ROI_HEADS.IN_FEATURES) == ["last_feat"]
    state, _, _ = read_checkpoint(dst)
    assert torch.equal(state["backbone.pos_embed"], ref.pos_embed.detach())
    for png, got in zip(pngs, grids_unresized(dst, pngs)):
        want = ref.patch_tokens(to_input(read_rgb(png)), rule)
        assert relative_error(got, want) < 1e-4, png.name


def test_acceptance_call_with_per_size_config(pngs, tmp_path, one_thread):
    """The check's exact call (a config per size) on the non-square DINO case."""
    ref = _reference("dino_training")
    src = layouts.write_dino_vit(ref.state_dict(), tmp_path / "checkpoint.pth")
    convert(src, tmp_path / "dino.pth")
    got = grid(tmp_path / "dino.pth", pngs[2])
    assert got.shape == (DIM, 12, 16)
    assert relative_error(got, ref.patch_tokens(to_input(read_rgb(pngs[2])), "dino")) < 1e-4


def test_wrong_rule_or_head_count_would_be_caught(pngs):
    """The checks above can fail: another rule or head count moves the tokens well past 1e-4."""
    ref = _reference("dino_training")
    x = to_input(read_rgb(pngs[1]))
    assert relative_error(ref.patch_tokens(x, "bicubic"), ref.patch_tokens(x, "dino")) > 1e-3
    other = RefViT(seed=5, dim=DIM, depth=DEPTH, heads=12, table="learned")
    other.load_state_dict(ref.state_dict())
    assert relative_error(other.patch_tokens(x, "dino"), ref.patch_tokens(x, "dino")) > 1e-3


def test_head_count_is_never_guessed(tmp_path, capsys):
    ref = _reference("mae_release")
    src = layouts.write_mae_release(ref.state_dict(), tmp_path / "mae_pretrain_vit_base.pth")
    err = refusal(src, tmp_path / "mae.pth", capsys=capsys)
    assert "--num-heads" in err
    src = layouts.write_dino_vit(ref.state_dict(), tmp_path / "dino.pth", arch="vit_small")
    err = refusal(src, tmp_path / "x.pth", "--num-heads", "12", capsys=capsys)
    assert "contradicts" in err and "6 heads" in err


def test_sincos_option_and_ambiguous_learned_table(tmp_path, capsys):
    ref = _reference("dino_training")
    torch.save({"model": ref.state_dict()}, tmp_path / "deit_like.pth")
    err = refusal(tmp_path / "deit_like.pth", tmp_path / "a.pth", "--num-heads", "6", capsys=capsys)
    assert "--format" in err
    convert(tmp_path / "deit_like.pth", tmp_path / "b.pth", "--format", "dino", "--num-heads", "6")
    assert get_cfg(tmp_path / "b.yaml").MODEL.VIT.POS_INTERP == "dino"


# name: (table, width, heads, writer, format, rule); real ViT-S / ViT-B shapes, depth 12.
REAL_VITS = {
    "mocov3_vit_small": ("mocov3", 384, 12, layouts.write_mocov3_vit, "bicubic"),
    "dino_vit_small": ("learned", 384, 6, layouts.write_dino_vit, "dino"),
    "mae_vit_base": ("mae", 768, 12, layouts.write_mae_pretrain, "bicubic"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_VITS))
def test_real_size_vits_at_real_sizes(name, pngs, tmp_path, one_thread):
    """The acceptance check's shapes: ViT-S (MoCo v3: 12 heads, DINO: 6) and ViT-B (MAE) with
    recorded architecture names, per-size configs, square and non-square inputs."""
    table, dim, heads, writer, rule = REAL_VITS[name]
    ref = RefViT(seed=9, dim=dim, depth=12, heads=heads, table=table)
    src = writer(ref.state_dict(), tmp_path / "source.pth")
    convert(src, tmp_path / "dst.pth")
    assert get_cfg(tmp_path / "dst.yaml").MODEL.VIT.NUM_HEADS == heads
    for png in pngs:
        want = ref.patch_tokens(to_input(read_rgb(png)), rule)
        assert relative_error(grid(tmp_path / "dst.pth", png), want) < 1e-4, png.name
