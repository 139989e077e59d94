"""Exact resume after kill -9 mid-epoch, and two torchrun CPU ranks against one process.

The runs are ``tests.engine.toy_run`` (a seconds-long regression with dropout, noisy data drawn
from all three global generators, a shuffled order, an EMA, evaluation and periodic checkpoints).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gridfeats.engine import KILL_ENV, load_training_state, read_metrics
from tests.engine import toy_run

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    )
    if KILL_ENV not in extra:
        env.pop(KILL_ENV, None)
    return env


def _toy(args, env, launcher=()):
    return subprocess.run(
        [sys.executable, *launcher, "-m", "tests.engine.toy_run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name


def _log(out: Path):
    return [
        (r["kind"], r["step"], r["epoch"], r.get("loss_mse"), r.get("lr"), r.get("score"))
        for r in read_metrics(out / "metrics.jsonl")
    ]


def _forked_toy(args, env_updates) -> int:
    """Run ``toy_run.main(args)`` in a forked child (no interpreter start-up); its exit code."""
    import multiprocessing

    def child() -> None:
        os.environ.update(env_updates)
        os._exit(toy_run.main(args))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(timeout=240)
    return process.exitcode


def _kill_and_resume(tmp_path: Path, loader: str, fork: bool) -> None:
    # 5 steps per epoch, 3 epochs, checkpoints every 3 steps and at epoch ends: killed after step
    # 8, the run resumes from the step-6 checkpoint (epoch 1, batch 1) and redoes steps 7-8.
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    toy_run.run(straight_dir, loader)
    args = ["--out", str(killed_dir), "--loader", loader]
    if fork:
        assert _forked_toy(args, {KILL_ENV: "8"}) == -signal.SIGKILL
    else:
        killed = _toy(args, _env(**{KILL_ENV: "8"}))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (killed_dir / "final.pt").exists()
    saved = load_training_state(killed_dir / "last.pt")
    assert saved["position"] == {"iteration": 6, "epoch": 1, "batch": 1}
    assert saved["note"] == "toy" and len(saved["rng"]) == 1

    toy_run.run(killed_dir, loader, resume=True)

    a = load_training_state(straight_dir / "final.pt")
    b = load_training_state(killed_dir / "final.pt")
    assert a["iteration"] == b["iteration"] == 15
    _assert_same_weights(a["model"], b["model"])
    _assert_same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    _assert_same_weights(a["hooks"]["EMA"]["shadow"], b["hooks"]["EMA"]["shadow"])
    assert a["hooks"]["BestCheckpointer"]["best"] == b["hooks"]["BestCheckpointer"]["best"]
    assert a["metrics"] == b["metrics"] and a["scheduler"] == b["scheduler"]
    assert _log(straight_dir) == _log(killed_dir)
    assert [r[1] for r in _log(straight_dir) if r[0] == "train"] == list(range(1, 16))


@pytest.mark.parametrize("loader", ["resumable", "shuffle"])
def test_kill_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path, loader):
    """The killed run is a forked child: SIGKILLed at an exact step, like kill -9."""
    _kill_and_resume(tmp_path, loader, fork=True)


@pytest.mark.slow
def test_kill_of_a_fresh_interpreter_then_resume_gives_bit_identical_weights(tmp_path):
    _kill_and_resume(tmp_path, "shuffle", fork=False)


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from gridfeats.engine import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_atomic(path, {"format": checkpoint.TRAINING_STATE_FORMAT, "iteration": 1})

    def torn_save(payload, target):
        Path(target).write_bytes(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(path, {"format": checkpoint.TRAINING_STATE_FORMAT, "iteration": 2})
    assert load_training_state(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_ddp_equals_single(ddp_dir: Path, single_dir: Path) -> None:
    single = toy_run.run(single_dir, batch_size=8, dropout=0.0, noise=False)
    a = load_training_state(ddp_dir / "final.pt")
    b = load_training_state(single_dir / "final.pt")
    assert len(a["rng"]) == 2 and a["iteration"] == b["iteration"] == single.max_iter == 15
    assert not any(k.startswith("module.") for k in a["model"])
    _assert_same_weights(a["model"], b["model"], exact=False)
    losses_a = [r[3] for r in _log(ddp_dir) if r[0] == "train"]
    losses_b = [r[3] for r in _log(single_dir) if r[0] == "train"]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)  # averaged over the ranks


DDP_ARGS = ["--batch-size", "4", "--no-noise", "--dropout", "0"]


def test_two_cpu_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    """Ranks of 4 samples (gloo, DDP) take the same steps as one process with batches of 8.

    The resumable sampler gives rank r every other index of an epoch's permutation, so the two
    rank batches of a step are exactly the single process's batch; with a mean loss, DDP's
    averaged gradient is the single-process gradient up to float rounding. The two ranks are
    forked from this process (no interpreter start-up); the slow variant runs real torchrun.
    """
    import multiprocessing

    port = str(_free_port())

    def rank_main(rank: int) -> None:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1"
        )
        os.environ["MASTER_PORT"] = port
        os._exit(toy_run.main(["--out", str(tmp_path / "ddp"), *DDP_ARGS]))

    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=rank_main, args=(r,)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=240)
    assert [p.exitcode for p in ranks] == [0, 0]
    _check_ddp_equals_single(tmp_path / "ddp", tmp_path / "single")


@pytest.mark.slow
def test_two_torchrun_cpu_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    launcher = (
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    )
    ddp = _toy(["--out", str(tmp_path / "ddp"), *DDP_ARGS], _env(), launcher)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _check_ddp_equals_single(tmp_path / "ddp", tmp_path / "single")
