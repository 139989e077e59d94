"""Winograd F(4x4, 3x3) (gridfeats/layers/winograd.py): the same convolution as the direct
kernel up to its known rounding, and taken by the fast mode only where it is meant to be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gridfeats.layers import Conv2d, winograd
from gridfeats.layers.winograd import prepare_winograd, winograd_conv3x3, winograd_pays_off


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize(
    "n, c, k, h, w, padding, bias",
    [
        (1, 16, 24, 13, 17, 1, True),  # odd sizes: the last tile row/column is partial
        (3, 8, 8, 9, 4, 1, False),  # several images, a map narrower than one tile
        (2, 5, 7, 11, 10, 0, True),  # "valid" convolution
        (1, 4, 6, 4, 4, 1, True),  # exactly one tile
    ],
)
def test_winograd_equals_the_convolution_within_its_rounding(n, c, k, h, w, padding, bias):
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    weight = torch.randn(k, c, 3, 3) / (9 * c) ** 0.5
    b = torch.randn(k) if bias else None
    reference = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), 1, padding)
    out = winograd_conv3x3(x, prepare_winograd(weight, b), padding)
    assert out.shape == reference.shape and out.is_contiguous()
    direct = F.conv2d(x, weight, b, 1, padding)
    # Direct fp32 is ~3e-7 from float64; F(4x4, 3x3)'s transforms cost about one more digit.
    assert _relative_error(out, reference) < 1e-5
    assert _relative_error(direct, reference) < 1e-6


def test_wide_channels_keep_the_error_at_a_few_millionths():
    torch.manual_seed(1)
    x = torch.randn(1, 512, 20, 24)
    weight = torch.randn(512, 512, 3, 3) / (9 * 512) ** 0.5
    reference = F.conv2d(x.double(), weight.double(), None, 1, 1)
    assert _relative_error(winograd_conv3x3(x, prepare_winograd(weight, None)), reference) < 1e-5


def test_only_3x3_filters_are_accepted():
    with pytest.raises(ValueError, match="3, 3"):
        prepare_winograd(torch.zeros(4, 4, 1, 1), None)
    weights = prepare_winograd(torch.zeros(4, 4, 3, 3), None)
    with pytest.raises(ValueError, match="channels"):
        winograd_conv3x3(torch.zeros(1, 3, 8, 8), weights)


def test_pays_off_only_for_wide_convolutions_over_enough_tiles():
    policy = winograd.WinogradPolicy(min_channels=512)
    side = 4 * int(policy.min_tiles**0.5 + 1)  # enough 4x4 output tiles

    def pays(x, k, padding=1, dilation=1):
        return winograd_pays_off(x, k, padding, dilation, policy=policy)

    assert pays(torch.zeros(1, 512, side, side), 512)
    assert not pays(torch.zeros(1, 512, side, side), 256)  # narrow output
    assert not pays(torch.zeros(1, 256, side, side), 512)  # narrow input
    assert not pays(torch.zeros(1, 512, 8, 8), 512)  # 4 tiles
    # Many small maps (per-region res5: 4 tiles per region) do not count as one large map.
    assert not pays(torch.zeros(300, 512, 7, 7), 512)
    assert not pays(torch.zeros(1, 512, side, side, dtype=torch.bfloat16), 512)
    assert not pays(torch.zeros(1, 512, side, side), 512, 2, 2)  # this policy keeps dilated direct


def test_dilated_convolutions_follow_the_policy_and_count_the_tiles_of_all_phases():
    policy = winograd.WinogradPolicy(min_channels=256, dilated=True)
    x = torch.zeros(1, 256, 38, 56)  # res5 at stride 16: 4 phases of 19x28, 35 tiles each
    assert winograd_pays_off(x, 256, 2, 2, policy=policy)
    assert not winograd_pays_off(x, 256, 1, 2, policy=policy)  # padding != dilation
    assert not winograd_pays_off(torch.zeros(1, 256, 16, 16), 256, 2, 2, policy=policy)


def test_each_cpu_family_has_its_measured_policy(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert winograd.cpu_policy() == winograd.WinogradPolicy(min_channels=256, dilated=True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert winograd.cpu_policy() == winograd.WinogradPolicy(min_channels=512)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert winograd.cpu_policy() is winograd.UNMEASURED_POLICY


@pytest.mark.parametrize(
    "n, c, k, h, w, dilation",
    [
        (1, 8, 12, 19, 28, 2),  # odd height: the phases differ in size before padding
        (2, 6, 5, 10, 9, 2),  # two images, odd width
        (1, 4, 4, 13, 14, 3),  # dilation 3, a map that is no multiple of 3
        (1, 4, 4, 3, 5, 2),  # a map barely larger than the filter's reach
    ],
)
def test_dilated_winograd_equals_the_dilated_convolution(n, c, k, h, w, dilation):
    torch.manual_seed(3)
    x = torch.randn(n, c, h, w)
    weight = torch.randn(k, c, 3, 3) / (9 * c) ** 0.5
    b = torch.randn(k)
    reference = F.conv2d(x.double(), weight.double(), b.double(), 1, dilation, dilation)
    out = winograd_conv3x3(x, prepare_winograd(weight, b), dilation, dilation)
    assert out.shape == reference.shape and out.is_contiguous()
    assert _relative_error(out, reference) < 1e-5
    with pytest.raises(ValueError, match="padding == dilation"):
        winograd_conv3x3(x, prepare_winograd(weight, b), 1, dilation)


def test_folded_conv_takes_winograd_only_at_stride_1_and_where_the_policy_allows(monkeypatch):
    policy = winograd.WinogradPolicy(min_channels=8, min_tiles=1)
    monkeypatch.setattr(winograd, "cpu_policy", lambda: policy)
    calls = []
    real = winograd_conv3x3

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr("gridfeats.layers.conv.winograd_conv3x3", spy)
    torch.manual_seed(2)
    conv = Conv2d(8, 8, 3, padding=1, bias=True)
    x = torch.randn(1, 8, 12, 12)
    exact = conv(x)
    conv.fold_norm(winograd=True)
    assert conv._winograd is None  # the transformed filters (4x the weights) wait for a use
    torch.testing.assert_close(conv(x), exact, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and conv._winograd is not None
    # The fast modes run channels-last; Winograd reads such an input as NCHW, same numbers.
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv(channels_last), conv(x)) and len(calls) == 3
    del calls[1:]
    # A per-call stride (res5 of grid extraction) falls back to the direct kernel, and so does
    # a dilation under a policy without dilated Winograd.
    torch.testing.assert_close(conv(x, stride=2), exact[..., ::2, ::2], rtol=1e-5, atol=1e-5)
    dilated = F.conv2d(x, conv.weight, conv.bias, 1, 2, 2)
    torch.testing.assert_close(conv(x, padding=2, dilation=2), dilated, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    with_dilated = winograd.WinogradPolicy(min_channels=8, min_tiles=1, dilated=True)
    monkeypatch.setattr(winograd, "cpu_policy", lambda: with_dilated)
    torch.testing.assert_close(conv(x, padding=2, dilation=2), dilated, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    del calls[1:]
    conv.fold_norm()  # without winograd=True: always direct
    conv(x)
    assert len(calls) == 1
    grouped = Conv2d(8, 8, 3, padding=1, groups=2)
    grouped.fold_norm(winograd=True)
    grouped(x)
    assert len(calls) == 1 and grouped._winograd is None
