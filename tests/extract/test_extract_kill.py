"""kill -9 of ``gridfeats extract`` at chosen and at random moments, then the same command again.

After the final, uninterrupted re-run every image's rows must equal those of an uninterrupted run.
Chosen moments use the store's crash points (``GRIDFEATS_STORE_CRASH_AT``: exactly between two
steps of the commit protocol); random moments are an external SIGKILL at a random time while the
job is writing, with DataLoader workers running (a killed run must not leave the output locked).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import warnings

import pytest
import torch

from gridfeats.extract.job import ExtractOptions, run_extraction
from gridfeats.features import BottomUpSettings
from gridfeats.store import FeatureStore
from gridfeats.store._crashpoints import ENV_VAR
from tests.extract.helpers import (
    SMALL,
    assert_same_content,
    cli_command,
    make_images,
    read_all,
    subprocess_env,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_IMAGES = 8
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp("synthetic")), NUM_IMAGES)


@pytest.fixture(scope="module")
def grid_reference(images, tmp_path_factory):
    """The uninterrupted grid run, computed once for all kill points (one thread, as the jobs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference(images, str(tmp_path_factory.mktemp("reference") / "grid.h5"))
    finally:
        torch.set_num_threads(previous)


def command(images: str, output: str, mode: str = "grid", workers: int = 0):
    extra = ["--regions", "bottom-up", "--min-boxes", "3"] if mode == "region" else []
    return cli_command(
        [
            "--config",
            "R-50-grid",
            "--input",
            images,
            "--output",
            output,
            "--mode",
            mode,
            "--dtype",
            "float32",
            "--commit-every",
            "1",
            "--workers",
            str(workers),
            "--no-progress",
            *extra,
            *SMALL,
        ]
    )


def reference(images: str, output: str, mode: str = "grid"):
    """The uninterrupted run, in this process (same code, same thread count as the subprocesses)."""
    run_extraction(
        ExtractOptions(
            input=images,
            output=output,
            config="R-50-grid",
            opts=list(SMALL),
            mode=mode,
            regions="bottom-up",
            bottom_up=BottomUpSettings(min_boxes=3),
            workers=0,
            dtype="float32",
            progress=False,
        )
    )
    return read_all(output)


def run_to_completion(cmd) -> None:
    result = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{NUM_IMAGES} stored, 0 failed" in result.stdout


def check_readable(output: str) -> None:
    """Whatever a kill left opens: the output (if any) and every committed part, rows included."""
    parts = output + ".parts"
    files = [output] if os.path.exists(output) else []
    if os.path.isdir(parts):
        files += [
            os.path.join(parts, n)
            for n in os.listdir(parts)
            if n.startswith("part-") and n.endswith(".h5")
        ]
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "a run into ... is unfinished"
            store = FeatureStore(path)
        for image_id in store:
            assert store[image_id]["features"].shape[0] == store.count(image_id) > 0


@pytest.mark.parametrize(
    "crash_at",
    [
        "part:before-rename:3",
        "final:mid-write",
        pytest.param("part:mid-write:5", marks=pytest.mark.slow),
        pytest.param("writer:before-rmtree", marks=pytest.mark.slow),
    ],
)
def test_kill_at_a_commit_step_then_resume(images, grid_reference, tmp_path, crash_at):
    expected = grid_reference
    out = str(tmp_path / "killed.h5")
    env = subprocess_env()
    env[ENV_VAR] = crash_at
    killed = subprocess.run(
        command(images, out), env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    check_readable(out)
    run_to_completion(command(images, out))
    assert not os.path.exists(out + ".parts")
    assert_same_content(expected, read_all(out))


def count_parts(output: str) -> int:
    parts = output + ".parts"
    try:
        return sum(name.startswith("part-") for name in os.listdir(parts))
    except OSError:
        return 0


def kill_randomly(cmd, output: str, rng: random.Random) -> bool:
    """Start the job and SIGKILL it a random moment after a random number (1-3) of new commits;
    returns False if it finished first."""
    target = count_parts(output) + rng.randint(1, 3)
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline and count_parts(output) < target:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return not finished


def random_kill_rounds(images, tmp_path, mode: str, rounds: int, seed: int, expected=None) -> None:
    expected = (
        expected
        if expected is not None
        else reference(images, str(tmp_path / "reference.h5"), mode)
    )
    out = str(tmp_path / "killed.h5")
    rng = random.Random(seed)
    cmd = command(images, out, mode, workers=2)
    kills = 0
    for _ in range(rounds):
        kills += kill_randomly(cmd, out, rng)
        check_readable(out)
    assert kills >= 1
    run_to_completion(cmd)
    assert_same_content(expected, read_all(out))


def test_kill_at_random_moments_with_workers_then_resume(images, grid_reference, tmp_path):
    random_kill_rounds(images, tmp_path, "grid", rounds=2, seed=1, expected=grid_reference)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grid", "region"])
def test_many_random_kills_then_resume(images, tmp_path, mode):
    random_kill_rounds(images, tmp_path, mode, rounds=6, seed=7)
