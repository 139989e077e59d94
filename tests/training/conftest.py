"""Detector-training tests: one thread (results depend on the thread count, and forked children
inherit it), and one synthetic data set per module."""

from __future__ import annotations

import pytest
import torch

from tests.training.helpers import synthetic_data


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("synthetic"))
