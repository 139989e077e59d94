"""ResNet/ResNeXt backbone (docs/detectron2-facts.md 3.2-3.7): output sizes, stride placement,
dilation override, deformable blocks. Channel widths are shrunk through config overrides (the
strides and block structure, which these tests are about, do not depend on them), so every forward
is cheap.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gridfeats.config import get_cfg
from gridfeats.layers import ShapeSpec
from gridfeats.modeling.backbone.resnet import (
    BottleneckBlock,
    DeformBottleneckBlock,
    build_resnet_backbone,
)

TINY = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "4", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8"]


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _tiny_backbone(config: str = "R-50-grid", extra=(), seed: int = 0):
    groups = (
        ["MODEL.RESNETS.NUM_GROUPS", "2", "MODEL.RESNETS.WIDTH_PER_GROUP", "2"]
        if config.startswith("X")
        else ["MODEL.RESNETS.WIDTH_PER_GROUP", "4"]
    )
    torch.manual_seed(seed)
    return build_resnet_backbone(get_cfg(config, opts=TINY + groups + list(extra))).eval()


def _ceil(n: int, d: int) -> int:
    return -(-n // d)


@pytest.mark.parametrize(
    "hw,dilated,undilated",
    [
        ((600, 901), (38, 57), (19, 29)),
        ((599, 1000), (38, 63), (19, 32)),
        ((337, 600), (22, 38), (11, 19)),
    ],
)
def test_output_sizes_match_spec(hw, dilated, undilated):
    backbone = _tiny_backbone()
    x = torch.zeros(1, 3, *hw)
    with torch.no_grad():
        detection = backbone(x, return_all=True)
        grid = backbone(x, res5_dilation=1)
    assert tuple(detection["res5"].shape[-2:]) == dilated
    assert tuple(grid["res5"].shape[-2:]) == undilated
    assert list(grid) == ["res5"]  # only the configured output unless return_all
    for name, stride in (("stem", 4), ("res2", 4), ("res3", 8), ("res4", 16)):
        assert tuple(detection[name].shape[-2:]) == (_ceil(hw[0], stride), _ceil(hw[1], stride)), (
            name
        )
    assert detection["res5"].shape[1] == 8 * 8  # 8 x RES2_OUT_CHANNELS
    assert backbone.output_shape() == {"res5": ShapeSpec(channels=64, stride=16)}


def _record_convs(block):
    """Hook conv1/conv2/shortcut of ``block``: name -> (input hw, output hw, call kwargs)."""
    seen = {}
    handles = []
    for name in ("conv1", "conv2", "shortcut"):
        conv = getattr(block, name)
        if conv is None:
            continue

        def hook(module, args, kwargs, output, name=name):
            seen[name] = (tuple(args[0].shape[-2:]), tuple(output.shape[-2:]), dict(kwargs))

        handles.append(conv.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("config,strided_conv", [("R-50-grid", "conv1"), ("X-101-grid", "conv2")])
def test_stride_on_1x1_for_r50_and_on_3x3_for_resnext(config, strided_conv):
    backbone = _tiny_backbone(config)
    assert backbone.res3[0].stride_in_1x1 is (config == "R-50-grid")
    seen, handles = _record_convs(backbone.res3[0])
    with torch.no_grad():
        backbone(torch.zeros(1, 3, 64, 96))
    for h in handles:
        h.remove()
    # res3 input is 16 x 24 (stride 4); its first block halves it in exactly one of conv1/conv2.
    other = "conv2" if strided_conv == "conv1" else "conv1"
    assert seen[strided_conv][1] == (8, 12)
    assert seen[other][0] == seen[other][1]
    assert seen["shortcut"] == ((16, 24), (8, 12), seen["shortcut"][2])


def test_res5_dilated_has_no_stride_and_grid_override_restores_it():
    backbone = _tiny_backbone()
    block = backbone.res5[0]
    seen, handles = _record_convs(block)
    x = torch.zeros(1, 3, 64, 96)  # res4: 4 x 6
    with torch.no_grad():
        backbone(x)
        detection = dict(seen)
        backbone(x, res5_dilation=1)
        grid = dict(seen)
    for h in handles:
        h.remove()
    assert detection["conv1"][1] == detection["conv2"][1] == detection["shortcut"][1] == (4, 6)
    assert detection["conv2"][2]["dilation"] == 2 and detection["conv2"][2]["padding"] == 2
    assert grid["conv1"][1] == (2, 3) and grid["shortcut"][1] == (2, 3)  # stride on conv1
    assert grid["conv2"][2]["dilation"] == 1 and grid["conv2"][2]["padding"] == 1
    # The module itself is unchanged after the override.
    assert block.dilation == 2


def test_grid_res5_dilation_key_chooses_the_grid_map_stride():
    """MODEL.GRID.RES5_DILATION 1 (default) is grid-feats-vqa's stride-32 map; 2 keeps the
    detector's own dilated stride-16 map. The weights (and the detection path) are the same."""
    default = _tiny_backbone()
    dilated = _tiny_backbone(extra=["MODEL.GRID.RES5_DILATION", "2"])
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        stride32 = default.grid_features(x)["res5"]
        stride16 = dilated.grid_features(x)["res5"]
        assert stride32.shape[-2:] == (2, 3) and stride16.shape[-2:] == (4, 6)
        torch.testing.assert_close(stride16, dilated(x)["res5"], rtol=0, atol=0)
        torch.testing.assert_close(stride32, default(x, res5_dilation=1)["res5"], rtol=0, atol=0)
        torch.testing.assert_close(default(x)["res5"], stride16, rtol=0, atol=0)
    with pytest.raises(ValueError, match="grid res5 dilation"):
        _tiny_backbone(extra=["MODEL.GRID.RES5_DILATION", "3"])


@pytest.mark.parametrize("config", ["R-50-grid", "X-152-challenge"])
def test_per_call_dilation_equals_a_model_built_with_that_dilation(config):
    dilated = _tiny_backbone(config, seed=1)
    if config == "X-152-challenge":  # make the offsets non-zero so conv2_offset's stride matters
        with torch.no_grad():
            for block in list(dilated.res4) + list(dilated.res5):
                block.conv2_offset.weight.normal_(std=0.05)
    undilated = _tiny_backbone(config, ["MODEL.RESNETS.RES5_DILATION", "1"], seed=2)
    undilated.load_state_dict(dilated.state_dict())
    x = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(dilated(x, res5_dilation=1)["res5"], undilated(x)["res5"])
        assert torch.equal(undilated(x, res5_dilation=2)["res5"], dilated(x)["res5"])
        assert dilated(x)["res5"].shape[-2:] == (5, 6) and undilated(x)["res5"].shape[-2:] == (3, 3)


def _block_pair(stride: int, dilation: int, stride_in_1x1: bool):
    torch.manual_seed(3)
    kwargs = dict(stride=stride, num_groups=2, stride_in_1x1=stride_in_1x1, dilation=dilation)
    plain = BottleneckBlock(8, 16, 8, **kwargs).eval()
    deform = DeformBottleneckBlock(8, 16, 8, **kwargs).eval()
    missing, unexpected = deform.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["conv2_offset.bias", "conv2_offset.weight"] and not unexpected
    return plain, deform


@pytest.mark.parametrize(
    "stride,dilation,stride_in_1x1", [(2, 1, False), (1, 2, False), (2, 1, True), (1, 1, False)]
)
def test_deform_block_with_zero_offsets_equals_plain_block(stride, dilation, stride_in_1x1):
    plain, deform = _block_pair(stride, dilation, stride_in_1x1)
    assert torch.count_nonzero(deform.conv2_offset.weight) == 0  # zero-initialised, as Detectron2
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(deform(x), plain(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            deform(x, dilation=1), plain(x, dilation=1), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("channel,pad", [(1, (0, 2, 1, 1)), (0, (1, 1, 0, 2))])
def test_deform_offset_channels_are_dy_then_dx(channel, pad):
    """Offset channel 2t is dy and 2t+1 is dx of tap t: a constant +1 offset in one of them equals
    a plain conv on the input shifted by one pixel along that axis (zeros beyond the border)."""
    _, deform = _block_pair(1, 1, False)
    with torch.no_grad():
        deform.conv2_offset.bias.zero_()
        deform.conv2_offset.bias[channel::2] = 1.0
    captured = {}
    h1 = deform.conv2_offset.register_forward_hook(lambda m, a, o: captured.__setitem__("u", a[0]))
    h2 = deform.conv2.norm.register_forward_hook(
        lambda m, a, o: captured.__setitem__("pre_norm", a[0])
    )
    with torch.no_grad():
        deform(torch.randn(1, 8, 6, 7))
    h1.remove()
    h2.remove()
    expected = F.conv2d(F.pad(captured["u"], pad), deform.conv2.weight, groups=2)
    torch.testing.assert_close(captured["pre_norm"], expected, rtol=1e-5, atol=1e-5)


def test_freeze_at_2_freezes_stem_and_res2_only():
    backbone = _tiny_backbone()
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.res2.parameters())
    assert all(p.requires_grad for p in backbone.res3.parameters())
    assert all(p.requires_grad for p in backbone.res5.parameters())


def test_bad_depth_and_dilation_are_refused():
    with pytest.raises(ValueError, match="DEPTH 34"):
        build_resnet_backbone(get_cfg("R-50-grid", opts=["MODEL.RESNETS.DEPTH", "34"]))
    with pytest.raises(ValueError, match="RES5_DILATION"):
        build_resnet_backbone(get_cfg("R-50-grid", opts=["MODEL.RESNETS.RES5_DILATION", "4"]))
