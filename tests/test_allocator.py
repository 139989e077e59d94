"""The glibc allocator tuning (gridfeats/allocator.py): the thresholds it sets, its switch, and
that a CPU Detector applies it."""

from __future__ import annotations

import pytest

from gridfeats import allocator


class _FakeLibc:
    def __init__(self, accept: bool = True):
        self.calls = []
        self.accept = accept

        def mallopt(param, value):
            self.calls.append((param, value))
            return 1 if self.accept else 0

        self.mallopt = mallopt


def _tune(monkeypatch, libc, libc_name="glibc", env=None):
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: (libc_name, "2.36"))
    if env is None:
        monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV_SWITCH, env)
    return allocator.retain_freed_memory.__wrapped__()


def test_sets_glibcs_largest_mmap_threshold_and_a_high_trim_threshold(monkeypatch):
    libc = _FakeLibc()
    assert _tune(monkeypatch, libc) is True
    assert libc.calls == [(-3, 32 * 1024 * 1024), (-1, 1024 * 1024 * 1024)]


@pytest.mark.parametrize("env", ["0", "off", "false"])
def test_the_switch_leaves_the_allocator_alone(monkeypatch, env):
    libc = _FakeLibc()
    assert _tune(monkeypatch, libc, env=env) is False and libc.calls == []


def test_other_c_libraries_and_a_refusal_change_nothing(monkeypatch, caplog):
    libc = _FakeLibc()
    assert _tune(monkeypatch, libc, libc_name="") is False and libc.calls == []
    refusing = _FakeLibc(accept=False)
    assert _tune(monkeypatch, refusing) is False
    assert "left as it was" in caplog.text


def test_a_cpu_detector_tunes_the_allocator(monkeypatch):
    from gridfeats.api import Detector
    from gridfeats.config import get_cfg

    calls = []
    monkeypatch.setattr("gridfeats.api.retain_freed_memory", lambda: calls.append(1))
    Detector(get_cfg("R-50-grid"), seed=0)
    assert calls == [1]
