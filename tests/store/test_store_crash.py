"""kill -9 of a writer process at chosen and at random moments, then the same command again.

After every kill the output (if any) and every committed part must open with h5py and hold only
correct rows; after the final, uninterrupted re-run the store must equal an uninterrupted run.
The job runs in a subprocess (``run_job`` below) so SIGKILL hits a real writer mid-protocol.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from gridfeats.store import FeatureStore, FeatureWriter, StoreMetadata, grid_record
from gridfeats.store._crashpoints import ENV_VAR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D = 8
META = StoreMetadata(mode="grid", feature_dim=D, config="CRASH: test\n", dtype="float16")


def expected_map(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal((D, 2 + i % 2, 3)).astype(np.float32)


def is_failure(i: int) -> bool:
    return i % 7 == 3


def run_job(out: str, n: int, commit_every: int, delay: float = 0.0) -> None:
    """The 'extraction command': same arguments, same result, skipping what is done."""
    with FeatureWriter(out, META, commit_every=commit_every, compression="gzip") as writer:
        done = writer.done_ids()
        for i in range(n):
            if str(i) in done:
                continue
            if delay:
                time.sleep(delay)
            if is_failure(i):
                writer.add_error(str(i), f"synthetic failure {i}")
            else:
                writer.add(str(i), grid_record(expected_map(i), (10 + i, 20), (30, 40)))


def launch(
    out: str, n: int, commit_every: int, delay: float = 0.0, crash_at: str = ""
) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(ENV_VAR, None)
    if crash_at:
        env[ENV_VAR] = crash_at
    code = (
        "from tests.store.test_store_crash import run_job; "
        f"run_job({out!r}, {n}, {commit_every}, {delay})"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


def check_store_file(path: str) -> int:
    """The file opens and every image it indexes has exactly the expected rows; returns its size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "run unfinished" is expected here
        store = FeatureStore(path)
    for image_id in store:
        i = int(image_id)
        assert not is_failure(i)
        np.testing.assert_array_equal(store.grid(image_id), expected_map(i).astype(np.float16))
        assert store[image_id]["image_hw"].tolist() == [10 + i, 20]
    for image_id, reason in store.errors:
        assert reason == f"synthetic failure {image_id}"
    store.close()
    return len(store)


def check_after_kill(out: str) -> None:
    if os.path.exists(out):
        check_store_file(out)
    for part in glob.glob(out + ".parts/part-*.h5"):
        check_store_file(part)


def check_complete(out: str, n: int) -> None:
    assert check_store_file(out) == sum(not is_failure(i) for i in range(n))
    store = FeatureStore(out)
    assert sorted(store.ids, key=int) == [str(i) for i in range(n) if not is_failure(i)]
    assert sorted(i for i, _ in store.errors) == sorted(str(i) for i in range(n) if is_failure(i))
    assert not os.path.exists(out + ".parts")
    leftovers = [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p or ".parts." in p]
    assert leftovers == []


CRASH_POINTS = [
    "writer:before-parts-dir",
    "part:mid-write:2",
    "part:before-rename:2",
    "part:after-rename:3",
    "final:mid-write",
    "final:before-rename",
    "final:after-rename",
    "writer:before-rmtree",
]


# Every step on a fresh run; on a run extending a finished output, the steps where the finished
# output and the parts coexist (the rest repeat fresh-run paths and run with --runslow).
EXTENDING_CHEAP = {"writer:before-parts-dir", "final:after-rename", "writer:before-rmtree"}
CASES = [pytest.param(point, 0, id=f"fresh-{point}") for point in CRASH_POINTS] + [
    pytest.param(
        point,
        9,
        id=f"extending-{point}",
        marks=() if point in EXTENDING_CHEAP else pytest.mark.slow,
    )
    for point in CRASH_POINTS
]


@pytest.mark.parametrize("crash_at, already_done", CASES)
def test_kill_at_each_protocol_step_then_rerun_equals_uninterrupted(
    tmp_path, crash_at, already_done
):
    n = 24
    out = str(tmp_path / "out.h5")
    if already_done:
        assert launch(out, already_done, 4).wait() == 0
    proc = launch(out, n, 4, crash_at=crash_at)
    assert proc.wait() == -signal.SIGKILL, f"the job did not reach {crash_at}"
    check_after_kill(out)
    assert launch(out, n, 4).wait() == 0
    check_complete(out, n)


def _random_kill_rounds(tmp_path, seed: int, kills: int) -> None:
    rng = random.Random(seed)
    n = 30
    out = str(tmp_path / f"random{seed}.h5")
    for _ in range(kills):
        proc = launch(out, n, 2, delay=0.01)
        time.sleep(rng.uniform(0.2, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_after_kill(out)
    assert launch(out, n, 2).wait() == 0
    check_complete(out, n)


def test_random_kills_then_rerun_equals_uninterrupted(tmp_path):
    _random_kill_rounds(tmp_path, seed=0, kills=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_many_random_kills(tmp_path, seed):
    _random_kill_rounds(tmp_path, seed=seed, kills=8)
