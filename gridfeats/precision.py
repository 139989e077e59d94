"""Which numeric precisions a device can run fast, and the autocast context for each.

fp32 is the exact mode (Detectron2's numbers). bf16 and fp16 are fast modes: bf16 on GPUs and on
CPUs with native bf16 instructions (AVX512-BF16 or AMX), fp16 on GPUs only. Asking for a fast mode
the hardware lacks is an error with an explanation, because on a CPU without native bf16 the "fast"
mode runs hundreds of times slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path
from typing import ContextManager, Optional, Tuple

import torch

from gridfeats.errors import GridfeatsError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(GridfeatsError, ValueError):
    """The requested precision is not supported (fast) on this device."""


class SlowPrecisionWarning(UserWarning):
    """The requested precision runs on this device, but not faster than fp32."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX-BF16) and torch uses AVX512."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx_bf16() -> bool:
    """True when the CPU has AMX-BF16 tiles, where oneDNN's bf16 kernels beat fp32 by 2.6-4.4x."""
    return "amx_bf16" in cpu_flags()


@functools.lru_cache(maxsize=1)
def measured_bf16_conv_speedup() -> float:
    """How much faster a bf16 3x3 convolution runs than fp32 on this CPU (fp32 time / bf16 time,
    best of 3 of a 256-channel 32x32 conv, each dtype in the layout the fast mode uses; about
    50 ms, once per process).

    Measured rather than assumed from the flags: without AMX, AVX512-BF16 alone gave 0.8x on an
    Intel Xeon and about 2x on an AMD EPYC (Zen 4), so the flags cannot say which.
    """
    import time

    x = torch.randn(1, 256, 32, 32)
    w = torch.randn(256, 256, 3, 3) * 0.02
    best = {}
    with torch.inference_mode():
        for dtype, fmt in (
            (torch.float32, torch.contiguous_format),
            (torch.bfloat16, torch.channels_last),
        ):
            xd = x.to(dtype).contiguous(memory_format=fmt)
            wd = w.to(dtype).contiguous(memory_format=fmt)
            torch.nn.functional.conv2d(xd, wd, padding=1)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                torch.nn.functional.conv2d(xd, wd, padding=1)
                times.append(time.perf_counter() - start)
            best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


@functools.lru_cache(maxsize=1)
def _warn_if_bf16_is_slow() -> None:
    # Once per process: every model built asks again.
    speedup = measured_bf16_conv_speedup()
    if speedup >= 1.0:
        return
    warnings.warn(
        f"this CPU has AVX512-BF16 but no AMX, and bf16 measured {speedup:.2f}x the fp32 speed "
        "of a 3x3 convolution here: bf16 runs natively but is not faster (seen on an Intel Xeon: "
        "convolution 0.8x, matmul 0.5x). Use fp32 unless memory matters.",
        SlowPrecisionWarning,
        stacklevel=3,
    )


def check_precision(precision: str, device: torch.device) -> None:
    """Raise :class:`PrecisionError` unless ``precision`` runs natively on ``device``."""
    if precision not in PRECISIONS:
        raise PrecisionError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise PrecisionError("this GPU has no bf16 support; use --precision fp16 or fp32")
        return
    if precision == "fp16":
        raise PrecisionError(
            "fp16 is a GPU mode; on the CPU use fp32 (exact) or bf16 (where native)"
        )
    if not cpu_has_native_bf16():
        raise PrecisionError(
            f"this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16/AMX) has no "
            "native bf16: bf16 would run far slower than fp32. Use --precision fp32."
        )
    if not cpu_has_amx_bf16():
        _warn_if_bf16_is_slow()


def autocast(precision: str, device: torch.device) -> ContextManager:
    """An autocast context for a fast mode, or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def compute_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype a fast mode computes in (``None`` for fp32: the weights' own dtype)."""
    return _DTYPES.get(precision)


# The layout the fast modes' kernels run in, chosen by measurement: oneDNN's bf16 (AMX/AVX512-BF16)
# convolutions are 1.5-3x faster channels-last than NCHW, cuDNN's tensor-core kernels want it, and
# for fp32 on a CPU the 1x1 convolutions of res2/res3 are 1.5-4.5x faster channels-last (the whole
# R-50 backbone 985 -> 789 ms at 608x1024 on 2 threads) while the 3x3 ones are within a few per
# cent either way; the Winograd RPN conv reads its input as NCHW (layers/winograd.py).
FAST_MEMORY_FORMAT = torch.channels_last
#: bf16 3x3 convolutions at least this wide run NCHW on CPUs without AMX (see conv_memory_format).
NCHW_BF16_MIN_CHANNELS = 2048


def conv_memory_format(
    in_channels: int, kernel_size: Tuple[int, int], precision: str, device: torch.device
) -> torch.memory_format:
    """The layout one folded convolution of a fast mode runs in: :data:`FAST_MEMORY_FORMAT`,
    except a bf16 3x3 convolution of 2048+ input channels (R-50-grid's RPN head) on a CPU
    without AMX, which oneDNN's AVX512-BF16 kernel runs faster NCHW: 409 against 326 GFLOP/s on
    the AMD EPYC (the layout table), a whole bf16 detection 1.01-1.04 -> 0.93 s. At 1024
    channels (updn's RPN head) the two layouts measured equal; AMX kernels want channels-last."""
    wide_3x3_bf16 = (
        precision == "bf16"
        and tuple(kernel_size) == (3, 3)
        and in_channels >= NCHW_BF16_MIN_CHANNELS
    )
    if device.type == "cpu" and wide_3x3_bf16 and not cpu_has_amx_bf16():
        return torch.contiguous_format
    return FAST_MEMORY_FORMAT
