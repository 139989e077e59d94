"""Shared pytest setup: the ``--runslow`` switch and the Detectron2 parity fixtures' location."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(
        reason="slow: run with --runslow (make test-all); a cheaper variant runs by default"
    )
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session", autouse=True)
def _bounded_threads():
    # CI machines have 2 cores; keep intra-op threads at that so timings and memory are predictable.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def one_thread():
    """Run the model on one thread: on a shared 2-core machine two OpenMP threads that wait for
    each other at every layer are up to 50x slower than one (results depend on the thread count,
    so subprocesses get the same count through :func:`cli_command`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
