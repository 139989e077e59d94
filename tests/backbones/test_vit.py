"""The ViT backbone's position-embedding rules, sin-cos layouts and padding, against the source
repos' own formulas (written in reference.py from docs/backbones.md)."""

from __future__ import annotations

import pytest
import torch

from gridfeats.modeling.backbone.vit import (
    VisionTransformer,
    resize_pos_embed_bicubic,
    resize_pos_embed_dino,
    sincos_2d_pos_embed,
)

from .reference import RefViT, mae_sincos, mocov3_sincos

DIM = 48
GRIDS = [(14, 14), (14, 20), (12, 16), (13, 16)]


def test_sincos_layouts_equal_mocov3_and_mae_formulas():
    rows_first = sincos_2d_pos_embed((14, 14), DIM, "sincos-rows-first")
    cols_first = sincos_2d_pos_embed((14, 14), DIM, "sincos-cols-first")
    assert torch.allclose(rows_first, mocov3_sincos(14, DIM)[0, 1:], atol=1e-6)
    assert torch.allclose(cols_first, mae_sincos(14, DIM)[0, 1:], atol=1e-6)
    assert (rows_first - cols_first).abs().max() > 0.5  # the two layouts are not interchangeable


@pytest.mark.parametrize("layout", ["sincos-rows-first", "sincos-cols-first"])
def test_non_square_sincos_is_the_square_table_cropped_in_row_major_order(layout):
    """Token (r, c) of a 14x20 grid gets the same code as (r, c) of a 20x20 grid: rows follow the
    row-major token order (MoCo v3's own builder breaks this at non-square sizes)."""
    square = sincos_2d_pos_embed((20, 20), DIM, layout).reshape(20, 20, DIM)
    wide = sincos_2d_pos_embed((14, 20), DIM, layout).reshape(14, 20, DIM)
    assert torch.equal(wide, square[:14, :20])


@pytest.mark.parametrize("grid", GRIDS)
def test_dino_rule_equals_dinos_interpolate_pos_encoding(grid):
    ref = RefViT(seed=1, dim=DIM, depth=0, heads=6, table="learned")
    h, w = grid[0] * 16, grid[1] * 16
    tokens = torch.zeros(1, 1 + grid[0] * grid[1], DIM)
    with torch.no_grad():
        want = ref.dino_interpolate_pos_encoding(tokens, h, w)[0, 1:]
        got = resize_pos_embed_dino(ref.pos_embed[0, 1:], grid, (h, w))
    assert torch.equal(got, want)


def test_dino_rule_is_not_size_based_bicubic_even_with_14_rows():
    table = RefViT(seed=1, dim=DIM, depth=0, heads=6, table="learned").pos_embed[0, 1:].detach()
    dino = resize_pos_embed_dino(table, (14, 20), (224, 320)).reshape(14, 20, DIM)
    sized = resize_pos_embed_bicubic(table, (14, 20)).reshape(14, 20, DIM)
    assert (dino - sized).norm() / sized.norm() > 1e-3


@pytest.mark.parametrize("grid", GRIDS)
def test_bicubic_rule_equals_vitdet_get_abs_pos(grid):
    ref = RefViT(seed=2, dim=DIM, depth=0, heads=6, table="mae")
    with torch.no_grad():
        want = ref.bicubic_pos(grid)[0, 1:]
        got = resize_pos_embed_bicubic(ref.pos_embed[0, 1:], grid)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("rule", ["dino", "bicubic"])
def test_patch_tokens_equal_the_reference_vit(rule):
    table = "learned" if rule == "dino" else "mocov3"
    ref = RefViT(seed=3, dim=DIM, depth=2, heads=12, table=table)
    vit = VisionTransformer(
        embed_dim=DIM, depth=2, num_heads=12, pos_embed="learned", pos_interp=rule
    ).eval()
    vit.load_state_dict(ref.state_dict())
    for gh, gw in GRIDS[:3]:
        x = torch.randn(1, 3, gh * 16, gw * 16)
        want = ref.patch_tokens(x, rule)
        with torch.no_grad():
            got = vit(x)["last_feat"][0]
        assert got.shape == (DIM, gh, gw)
        assert (got - want).norm() / want.norm() < 1e-5


def test_input_is_zero_padded_bottom_right_to_the_patch_size():
    vit = VisionTransformer(embed_dim=DIM, depth=1, num_heads=6).eval()
    x = torch.randn(1, 3, 200, 250)
    padded = torch.nn.functional.pad(x, (0, 6, 0, 8))
    with torch.no_grad():
        got, want = vit(x)["last_feat"], vit(padded)["last_feat"]
    assert got.shape == (1, DIM, 13, 16) and torch.equal(got, want)
    assert vit.size_divisibility == 16
    assert vit.output_shape()["last_feat"].stride == 16


def test_sincos_option_recomputes_and_learned_table_refuses_it():
    vit = VisionTransformer(
        embed_dim=DIM, depth=0, num_heads=6, pos_embed="sincos-cols-first", pos_interp="sincos"
    )
    table = vit.position_table((12, 16), (192, 256))[0, 1:]
    assert torch.equal(table, sincos_2d_pos_embed((12, 16), DIM, "sincos-cols-first"))
    with pytest.raises(ValueError, match="learned"):
        VisionTransformer(embed_dim=DIM, depth=0, num_heads=6, pos_interp="sincos")
