"""``torchrun --nproc_per_node 2 -m gridfeats extract`` on the CPU (gloo): two ranks, one file.

The merged result must hold the same rows as a single-process run (same thread count), the rank
files must be gone, and a second torchrun of the same command must find nothing to do.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from gridfeats.extract.job import ExtractOptions, run_extraction
from gridfeats.store import FeatureStore
from tests.extract.helpers import (
    SMALL,
    assert_same_content,
    make_images,
    read_all,
    subprocess_env,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_IMAGES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(images: str, output: str):
    runner = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which(
        "torchrun"
    )
    cmd = [
        runner,
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "gridfeats",
        "extract",
        "--threads",
        "1",
        "--config",
        "R-50-grid",
        "--input",
        images,
        "--output",
        output,
        "--dtype",
        "float32",
        "--workers",
        "0",
        "--no-progress",
        *SMALL,
    ]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp("synthetic")), NUM_IMAGES)


def test_torchrun_two_ranks_merge_into_one_file(images, tmp_path):
    if not (
        shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    ):
        pytest.skip("torchrun is not installed next to this Python")
    single = str(tmp_path / "single.h5")
    run_extraction(
        ExtractOptions(
            input=images,
            output=single,
            config="R-50-grid",
            opts=list(SMALL),
            workers=0,
            dtype="float32",
            progress=False,
        )
    )
    out = str(tmp_path / "ranks.h5")
    result = torchrun(images, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{NUM_IMAGES} stored, 0 failed" in result.stdout
    assert result.stdout.count("output ") == 1  # only rank 0 reports
    assert sorted(os.listdir(tmp_path)) == [
        "ranks.h5",
        "single.h5",
    ]  # rank files merged and removed
    assert_same_content(read_all(single), read_all(out))
    assert len(FeatureStore(out)) == NUM_IMAGES


@pytest.mark.slow
def test_torchrun_again_finds_nothing_to_do(images, tmp_path):
    out = str(tmp_path / "ranks.h5")
    assert torchrun(images, out).returncode == 0
    before = read_all(out)
    stamp = os.stat(out).st_mtime_ns
    again = torchrun(images, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 processed (0 failed), {NUM_IMAGES} already done" in again.stdout
    assert os.stat(out).st_mtime_ns == stamp  # nothing new: the merged file is not rewritten
    assert_same_content(before, read_all(out))
