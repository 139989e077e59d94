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
(``Conv2d.fold_norm``): only the RPN head's conv does (about 600 MB extra for R-50-grid's 2048
channels), not every 3x3 conv of the backbone.

It pays off only where the matmuls are large (many channels, many tiles per image); others
stay direct (:func:`winograd_pays_off`, thresholds measured by ``benchmarks/extract.py``'s
layout table, whose "winograd" column shows the path on each representative layer).
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

# Measured on a 2-core AMD EPYC (AVX-512; benchmarks/extract.py's layout table, 2 threads): the
# RPN's 3x3 conv at 38x56 (140 tiles per image) runs 1.6x (2048 channels) and 1.85x (1024) the
# direct kernel; the per-region res5 3x3 over 7x7 maps (4 tiles per region, a third of them
# padding) gains nothing at 100 regions and loses at 300 (0.65x: the transforms dominate), and
# narrower convolutions lose too. Hence: wide filters, and maps of many tiles per image.
MIN_CHANNELS = 512
MIN_TILES = 96  # 4x4 output tiles per image


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


def winograd_pays_off(x: torch.Tensor, out_channels: int, padding: int) -> bool:
    """Whether the Winograd path is expected to beat the direct kernel for an fp32 CPU input
    ``x`` and a 3x3 filter bank with ``out_channels`` outputs."""
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if min(x.shape[1], out_channels) < MIN_CHANNELS:
        return False
    height = x.shape[2] + 2 * padding - 2
    width = x.shape[3] + 2 * padding - 2
    tiles_per_image = (-(-height // TILE)) * (-(-width // TILE))
    return height > 0 and width > 0 and tiles_per_image >= MIN_TILES


def winograd_conv3x3(x: torch.Tensor, weights: WinogradWeights, padding: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding)`` for a 3x3 ``weight``, computed
    with F(4x4, 3x3); contiguous NCHW out (a channels-last input is read as NCHW)."""
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
