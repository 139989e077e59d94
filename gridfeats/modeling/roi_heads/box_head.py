"""``FastRCNNConvFCHead``: optional convs then fully connected layers (grid configs: 2 FC of
1024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gridfeats.layers import Conv2d


class FastRCNNConvFCHead(nn.Module):
    """Pooled ``[R, C, S, S]`` -> ``[R, FC_DIM]`` (``fc7`` for the grid-feats configs)."""

    def __init__(
        self,
        in_channels: int,
        pooler_resolution: int,
        num_conv: int = 0,
        conv_dim: int = 256,
        num_fc: int = 2,
        fc_dim: int = 1024,
        conv_norm: str = "",
    ):
        super().__init__()
        if num_conv + num_fc == 0:
            raise ValueError("the box head needs at least one conv or fc layer")
        if conv_norm:
            raise ValueError("normalisation in the box head convs is not supported")
        self.convs = []
        channels = in_channels
        for k in range(num_conv):
            conv = Conv2d(channels, conv_dim, 3, padding=1, bias=True)
            self.add_module(f"conv{k + 1}", conv)
            self.convs.append(conv)
            channels = conv_dim
        size = channels * pooler_resolution * pooler_resolution
        self.fcs = []
        for k in range(num_fc):
            fc = nn.Linear(size, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.constant_(fc.bias, 0)
            self.add_module(f"fc{k + 1}", fc)
            self.fcs.append(fc)
            size = fc_dim
        self.output_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        if self.fcs:
            x = torch.flatten(x, start_dim=1)
            for fc in self.fcs:
                x = F.relu(fc(x))
        return x
