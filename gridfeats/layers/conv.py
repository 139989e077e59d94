"""Conv2d carrying its norm as a child module (Detectron2's naming: ``conv.weight``,
``conv.norm.*``)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .winograd import WinogradWeights, prepare_winograd, winograd_conv3x3, winograd_pays_off

_Pair = Union[int, Tuple[int, int]]


def _single(value: _Pair) -> Optional[int]:
    """The one value of a square (int or equal-pair) conv argument, else ``None``."""
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    return None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` + optional ``norm`` child; stride/padding/dilation can be overridden per call.

    The per-call override lets one set of weights run both as the dilated detector (res5 stride 16)
    and as grid-feats-vqa's undilated extractor (stride 32) without copying the model or mutating
    it, so concurrent callers never see each other's setting.
    """

    def __init__(self, *args, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self._folded: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._folded_format = torch.contiguous_format
        self._winograd_allowed = False  # fold_norm(winograd=True) on a 3x3, ungrouped conv
        self._winograd: Optional[WinogradWeights] = None  # prepared on first use

    def forward(
        self,
        x: torch.Tensor,
        stride: Optional[_Pair] = None,
        padding: Optional[_Pair] = None,
        dilation: Optional[_Pair] = None,
    ) -> torch.Tensor:
        stride = self.stride if stride is None else stride
        padding = self.padding if padding is None else padding
        dilation = self.dilation if dilation is None else dilation
        if self._folded is not None:
            weight, bias = self._folded
            if self._folded_format == torch.contiguous_format and not x.is_contiguous():
                x = x.contiguous()  # a conv that runs faster NCHW inside a channels-last model
            if self._winograd_allowed and self._runs_winograd(x, stride, padding, dilation):
                if self._winograd is None:  # 4x the weights' memory: only where it is used
                    self._winograd = prepare_winograd(weight, bias)
                return winograd_conv3x3(x, self._winograd, _single(padding), _single(dilation))
            return F.conv2d(x, weight, bias, stride, padding, dilation, self.groups)
        x = F.conv2d(x, self.weight, self.bias, stride, padding, dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def _runs_winograd(
        self, x: torch.Tensor, stride: _Pair, padding: _Pair, dilation: _Pair
    ) -> bool:
        pad, dil = _single(padding), _single(dilation)
        if _single(stride) != 1 or pad is None or dil is None:
            return False
        return winograd_pays_off(x, self.out_channels, pad, dil)

    def fold_norm(
        self,
        dtype: Optional[torch.dtype] = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        winograd: bool = False,
    ) -> None:
        """Precompute ``conv`` with the frozen norm folded in (faster inference, float noise only).

        ``dtype`` stores the folded weights in a fast mode's compute dtype (bf16/fp16), so autocast
        does not cast them again at every call; ``memory_format`` is the layout the kernels read.
        A conv without a foldable norm gets the same treatment (one code path for the fast mode).
        The original weights and buffers stay untouched (state dicts and exact mode are unchanged);
        :meth:`unfold_norm` returns to the exact two-step computation. ``winograd`` also prepares
        the F(4x4, 3x3) path (fp32 CPU fast mode; ``layers/winograd.py``) for a 3x3, ungrouped
        convolution, taken per call where it pays off (stride 1, wide enough, dilated only where
        this CPU's ``winograd.cpu_policy()`` says so); its transformed filters are computed on the
        first such call.
        """
        scale_and_shift = getattr(self.norm, "scale_and_shift", None)
        if scale_and_shift is None and self.norm is not None:
            return
        with torch.no_grad():
            if scale_and_shift is None:
                weight, bias = self.weight, self.bias
            else:
                scale, shift = scale_and_shift()
                weight = self.weight * scale.reshape(-1, 1, 1, 1)
                bias = shift if self.bias is None else self.bias * scale + shift
            if dtype is not None:
                weight = weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
        weight = weight.contiguous(memory_format=memory_format)
        self._folded = (weight, None if bias is None else bias.contiguous())
        self._folded_format = memory_format
        self._winograd = None
        self._winograd_allowed = winograd and self.groups == 1 and tuple(self.kernel_size) == (3, 3)

    def unfold_norm(self) -> None:
        self._folded = None
        self._winograd_allowed = False
        self._winograd = None
