"""Winograd F(4x4, 3x3) convolution for the fast fp32 mode on CPUs.

Why: oneDNN's direct fp32 convolution already runs at (or above) the fp32 matmul's rate, so the
widest 3x3 convolution of the detectors (the RPN head's, on 1024-2048 channels: about 40% of an
R-50-grid detection's arithmetic) cannot get faster by layout or fusion. Winograd's minimal
filtering computes each 4x4 output tile from a 6x6 input tile with 36 multiplications per channel
pair instead of 144: the convolution becomes 36 independent ``[K, C] @ [C, tiles]`` matmuls plus
cheap linear transforms, about a quarter of the direct method's arithmetic (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016, whose F(4x4, 3x3) matrices these are).

The price is rounding: the transforms carry coefficients up to 8 and 1/24, so outputs differ from
the direct convolution by about 2e-6 relative (direct fp32: 3e-7 against float64). That is why it
belongs to the fast mode only; the exact mode keeps oneDNN's direct kernel, bit for bit.

The transformed filters take 4x the memory of the weights (36 values per 3x3 filter), so a
convolution prepares them on its first call that takes the path, not when the fast mode is set up
(``Conv2d.fold_norm``): only the convolutions that take it, e.g. the RPN head's (about 600 MB
extra for R-50-grid's 2048 channels) and, on AVX2, res4's and res5's 3x3 convs (about 170 MB).

It pays off only where the matmuls are large (many channels, many tiles per image), and where
that starts depends on the CPU: oneDNN's direct AVX2 kernels run below the matmul's rate, so on
AVX2 Winograd wins from 256 channels and on ResNet's dilated res5 too, while on AVX-512 it wins
from 512 channels (:class:`WinogradPolicy`, :data:`POLICIES`, measured by
``benchmarks/extract.py``'s layout table, whose "winograd" column times the path on each
representative layer and marks where this CPU's fast mode takes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

_F64 = torch.float64
# F(4, 3): input transform B^T (6x6), filter transform G (6x3), output transform A^T (4x6).
_BT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=_F64,
)
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=_F64,
)
_AT = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    dtype=_F64,
)
TILE = 4  # output tile side
_INPUT_TILE = TILE + 2  # 6: input tile side for a 3x3 filter


@dataclass(frozen=True)
class WinogradPolicy:
    """Where F(4x4, 3x3) beats oneDNN's direct fp32 kernel on one CPU family (by measurement:
    ``benchmarks/extract.py``'s layout table prints both on the CPU it runs on).

    ``min_channels``: the narrower of input and output channels; ``min_tiles``: 4x4 output tiles
    per image (all phases of a dilated conv together), because many small maps (updn's per-region
    res5 on 7x7: 4 tiles per region, a third of them padding) lose to the direct kernel;
    ``dilated``: a dilated conv (padding equal to its dilation, as in ResNet's dilated res5) is
    computed as dilation**2 undilated convs on the interleaved phases of its input.
    """

    min_channels: int
    min_tiles: int = 96
    dilated: bool = False


#: Measured on 2-core AMD EPYCs, 2 threads, direct kernel in its fastest layout:
#: * AVX-512: the RPN's 3x3 conv at 38x56 (140 tiles) 1.6x (2048 channels) and 1.85x (1024);
#:   per-region res5 on 7x7 maps 1.0x at 100 regions, 0.65x at 300; narrower convolutions lose.
#:   Dilated convolutions were not measured there, so they stay direct.
#: * AVX2 (direct kernels run at about the matmul's rate): RPN 2.0-2.2x (2048 channels) and
#:   2.1-2.5x (1024); res4's 3x3 on 256 channels 1.2-1.4x; res5's dilated 3x3 on 512 channels at
#:   38x56 1.55-1.75x (2.0x against channels-last, which runs dilated convs slowest there);
#:   128 channels 0.8-1.1x (not taken), 64 channels 0.4x.
POLICIES = {
    "AVX512": WinogradPolicy(min_channels=512),
    "AVX2": WinogradPolicy(min_channels=256, dilated=True),
}
#: CPUs of another family keep the direct kernel except for the widest convolutions.
UNMEASURED_POLICY = POLICIES["AVX512"]


def cpu_policy() -> WinogradPolicy:
    """The policy for this CPU, by ``torch.backends.cpu.get_cpu_capability()``."""
    return POLICIES.get(torch.backends.cpu.get_cpu_capability(), UNMEASURED_POLICY)


@dataclass(frozen=True)
class WinogradWeights:
    """A 3x3 filter bank in the Winograd domain, prepared once per convolution.

    ``filters`` is ``[36, K, C]`` (computed in float64, stored in float32); ``input_transform``
    ``[36, 36]`` and ``output_transform`` ``[16, 36]`` are the Kronecker squares of B^T and A^T.
    """

    filters: torch.Tensor
    input_transform: torch.Tensor
    output_transform: torch.Tensor
    bias: Optional[torch.Tensor]

    @property
    def out_channels(self) -> int:
        return int(self.filters.shape[1])

    @property
    def in_channels(self) -> int:
        return int(self.filters.shape[2])


def prepare_winograd(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> WinogradWeights:
    """Transform a ``[K, C, 3, 3]`` filter bank (and its bias) for :func:`winograd_conv3x3`."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(
            f"Winograd F(4x4, 3x3) needs a [K, C, 3, 3] weight, got {tuple(weight.shape)}"
        )
    with torch.no_grad():
        g = _G.to(weight.device)
        u = torch.einsum("ij,kcjl,ml->imkc", g, weight.detach().to(_F64), g)
        filters = u.reshape(_INPUT_TILE**2, weight.shape[0], weight.shape[1])
        dtype = weight.dtype
        return WinogradWeights(
            filters=filters.to(dtype).contiguous(),
            input_transform=torch.kron(_BT, _BT).to(weight.device, dtype),
            output_transform=torch.kron(_AT, _AT).to(weight.device, dtype),
            bias=None if bias is None else bias.detach().to(dtype).contiguous(),
        )


def winograd_pays_off(
    x: torch.Tensor,
    out_channels: int,
    padding: int,
    dilation: int = 1,
    policy: Optional[WinogradPolicy] = None,
) -> bool:
    """Whether the Winograd path is expected to beat the direct kernel for an fp32 CPU input
    ``x`` and a 3x3 filter bank with ``out_channels`` outputs (``policy``: this CPU's)."""
    policy = cpu_policy() if policy is None else policy
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if min(x.shape[1], out_channels) < policy.min_channels:
        return False
    if dilation != 1 and not (policy.dilated and padding == dilation):
        return False
    height = x.shape[2] + 2 * padding - 2 * dilation
    width = x.shape[3] + 2 * padding - 2 * dilation
    tiles_per_phase = (-(-height // (TILE * dilation))) * (-(-width // (TILE * dilation)))
    tiles_per_image = tiles_per_phase * dilation**2
    return height > 0 and width > 0 and tiles_per_image >= policy.min_tiles


def winograd_conv3x3(
    x: torch.Tensor, weights: WinogradWeights, padding: int = 1, dilation: int = 1
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding, dilation=dilation)`` for a 3x3
    ``weight``, computed with F(4x4, 3x3); contiguous NCHW out (a channels-last input is read as
    NCHW). A dilated conv needs ``padding == dilation`` (same-size output: ResNet's dilated
    res5)."""
    if dilation != 1:
        return _dilated(x, weights, padding, dilation)
    x = x.contiguous()
    n, c, h, w = x.shape
    if c != weights.in_channels:
        raise ValueError(f"input has {c} channels, the filters expect {weights.in_channels}")
    k = weights.out_channels
    out_h, out_w = h + 2 * padding - 2, w + 2 * padding - 2
    tiles_h, tiles_w = -(-out_h // TILE), -(-out_w // TILE)
    tiles = n * tiles_h * tiles_w
    side = _INPUT_TILE
    x = F.pad(
        x,
        (padding, TILE * tiles_w + 2 - w - padding, padding, TILE * tiles_h + 2 - h - padding),
    )
    # Overlapping 6x6 input tiles with stride 4, one row per (channel, image, tile).
    patches = x.unfold(2, side, TILE).unfold(3, side, TILE)  # N, C, th, tw, 6, 6
    patches = patches.permute(1, 0, 2, 3, 4, 5).reshape(c * tiles, side * side)
    transformed = torch.mm(weights.input_transform, patches.t()).view(side * side, c, tiles)
    products = torch.bmm(weights.filters, transformed)  # 36, K, tiles
    out = torch.mm(weights.output_transform, products.view(side * side, k * tiles))
    out = out.view(TILE, TILE, k, n, tiles_h, tiles_w).permute(3, 2, 4, 0, 5, 1)
    out = out.reshape(n, k, TILE * tiles_h, TILE * tiles_w)[:, :, :out_h, :out_w]
    if weights.bias is not None:
        out = out + weights.bias.view(1, -1, 1, 1)
    return out.contiguous()


def _dilated(
    x: torch.Tensor, weights: WinogradWeights, padding: int, dilation: int
) -> torch.Tensor:
    """A 3x3 conv with dilation d and padding d as d*d undilated convs with padding 1.

    Output pixel (d*i + r, d*j + s) reads only input pixels of the same phase (r, s), at distance
    d: on the phase's own subsampled map those are the 3x3 neighbours. The map is zero-padded to a
    multiple of d at the bottom and right (zeros are what the padded conv sees there anyway), the
    phases become a batch of d*d images, and the output is interleaved back and cropped.
    """
    if padding != dilation:
        raise ValueError(
            f"a dilated Winograd conv needs padding == dilation, got {padding} and {dilation}"
        )
    d = dilation
    n, c, h, w = x.shape
    ph, pw = -(-h // d), -(-w // d)
    x = F.pad(x.contiguous(), (0, pw * d - w, 0, ph * d - h))
    phases = x.view(n, c, ph, d, pw, d).permute(0, 3, 5, 1, 2, 4).reshape(n * d * d, c, ph, pw)
    out = winograd_conv3x3(phases, weights, 1)
    k = out.shape[1]
    out = out.view(n, d, d, k, ph, pw).permute(0, 3, 4, 1, 5, 2).reshape(n, k, ph * d, pw * d)
    return out[:, :, :h, :w].contiguous()
