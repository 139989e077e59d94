"""Precision checks: fp32 always; bf16 only where the CPU has native bf16; fp16 only on GPUs."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import gridfeats.precision as precision
from gridfeats.precision import PrecisionError, autocast, check_precision

CPU = torch.device("cpu")


def test_fp32_is_always_accepted_and_autocast_is_a_no_op():
    check_precision("fp32", CPU)
    assert isinstance(autocast("fp32", CPU), contextlib.nullcontext)


def test_unknown_precision_is_refused():
    with pytest.raises(PrecisionError, match="unknown precision 'fp64'"):
        check_precision("fp64", CPU)
    assert issubclass(PrecisionError, ValueError)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(PrecisionError, match="fp16 is a GPU mode"):
        check_precision("fp16", CPU)


def test_bf16_on_cpu_without_native_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(PrecisionError, match="no native bf16"):
        check_precision("bf16", CPU)


def test_bf16_on_cpu_with_native_bf16_is_accepted_with_a_bf16_autocast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    check_precision("bf16", CPU)
    ctx = autocast("bf16", CPU)
    assert isinstance(ctx, torch.autocast)
    with ctx:
        out = torch.mm(torch.ones(2, 2), torch.ones(2, 2))
    assert out.dtype == torch.bfloat16


def test_bf16_without_amx_warns_once_where_it_measured_slower(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.setattr(precision, "measured_bf16_conv_speedup", lambda: 0.8)
    precision._warn_if_bf16_is_slow.cache_clear()
    with pytest.warns(precision.SlowPrecisionWarning, match="0.80x"):
        check_precision("bf16", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("bf16", CPU)  # once per process, not per model
    # AVX512-BF16 CPUs where bf16 does pay (an AMD EPYC measured about 2x): no warning.
    monkeypatch.setattr(precision, "measured_bf16_conv_speedup", lambda: 2.0)
    precision._warn_if_bf16_is_slow.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("bf16", CPU)
    precision._warn_if_bf16_is_slow.cache_clear()


def test_the_bf16_speed_probe_measures_a_positive_ratio():
    if not precision.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    speedup = precision.measured_bf16_conv_speedup()
    assert 0 < speedup < float("inf")
    assert precision.measured_bf16_conv_speedup() == speedup  # measured once per process


@pytest.mark.parametrize(
    "capability,flags,expected",
    [
        ("AVX2", {"avx512_bf16", "amx_bf16"}, False),  # torch not using AVX512 kernels
        ("AVX512", {"avx512f"}, False),
        ("AVX512", {"avx512f", "avx512_bf16"}, True),
        ("AVX512", {"amx_bf16"}, True),
    ],
)
def test_native_bf16_detection(monkeypatch, capability, flags, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.cpu_has_native_bf16() is expected


def test_cpu_flags_reads_the_flags_line(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16\nbugs\t\t: none\n")
    real_path = precision.Path
    monkeypatch.setattr(
        precision, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p)
    )
    precision.cpu_flags.cache_clear()
    try:
        assert precision.cpu_flags() == frozenset({"fpu", "sse", "avx512_bf16"})
    finally:
        precision.cpu_flags.cache_clear()


def test_fast_modes_run_channels_last_but_wide_bf16_3x3_runs_nchw_without_amx(monkeypatch):
    cpu, cl, nchw = torch.device("cpu"), torch.channels_last, torch.contiguous_format
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    assert precision.conv_memory_format(2048, (3, 3), "bf16", cpu) == nchw  # R-50-grid RPN
    assert precision.conv_memory_format(1024, (3, 3), "bf16", cpu) == cl  # updn's RPN: equal
    assert precision.conv_memory_format(2048, (1, 1), "bf16", cpu) == cl
    assert precision.conv_memory_format(2048, (3, 3), "fp32", cpu) == cl  # Winograd reads NCHW
    assert precision.conv_memory_format(2048, (3, 3), "bf16", torch.device("cuda")) == cl
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    assert precision.conv_memory_format(2048, (3, 3), "bf16", cpu) == cl


def test_a_conv_folded_nchw_reads_a_channels_last_input_as_nchw():
    from gridfeats.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(8, 4, 3, padding=1, bias=True)
    x = torch.randn(2, 8, 9, 7)
    conv.fold_norm(None, torch.contiguous_format)
    out = conv(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous() and torch.equal(out, conv(x))
    conv.fold_norm(None, torch.channels_last)
    assert conv(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )
