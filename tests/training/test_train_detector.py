"""``gridfeats train-detector`` end to end on make-synthetic data with a tiny detector.

Six iterations of two images (checkpoints every 3), evaluation on the held-out split at the end.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from gridfeats.cli import main as gridfeats_main
from gridfeats.engine import KILL_ENV, load_training_state, read_metrics
from tests.training.helpers import TINY_CONFIG, eval_files, final_weights, forked, train_args

LOSSES = {"loss_cls", "loss_box_reg", "loss_attr", "loss_rpn_cls", "loss_rpn_loc"}


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "det"
    torch.set_num_threads(1)
    assert gridfeats_main(train_args(data, out)) == 0
    return out


def _log(out):
    """The metrics log without wall-clock times."""
    return [
        {k: v for k, v in r.items() if k != "time"} for r in read_metrics(out / "metrics.jsonl")
    ]


def test_a_run_writes_checkpoints_metrics_curve_and_evaluation(run):
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "last.pt", "model_final.pth", "metrics.jsonl", "loss_curve.png"} <= names

    state = load_training_state(run / "last.pt")
    assert state["iteration"] == 6
    assert {"model", "optimizer", "scheduler", "rng"} <= set(state)
    assert state["scheduler"]["last_epoch"] == 6  # stepped once per iteration
    final = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 6
    for name, value in final["model"].items():
        assert torch.equal(value, state["model"][name]), name

    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(LOSSES <= set(r) and r["total_loss"] > 0 for r in train)
    # warm-up: lr = BASE_LR * (0.001 * (1 - t/2) + t/2) at t = 0 and 1, then BASE_LR
    assert [r["lr"] for r in train] == pytest.approx([1e-5, 0.005005, 0.01, 0.01, 0.01, 0.01])
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6]
    assert {"bbox/AP", "bbox/AP50", "bbox/AP75", "attr/mAP", "attr/top1", "attr/top5"} <= set(
        evals[0]
    )

    with Image.open(run / "loss_curve.png") as png:
        assert png.format == "PNG" and png.size == (960, 540)
        assert (
            len(png.convert("RGB").getcolors(maxcolors=1 << 16)) > 4
        )  # axes, text and coloured lines

    files = eval_files(run)
    assert list(files) == ["iter_0000006.json"]
    result = files["iter_0000006.json"]["datasets"]["instances_val"]
    assert result["images"] == 2
    assert result["bbox"]["AP"] == pytest.approx(evals[0]["bbox/AP"])
    assert set(result["attributes"]) >= {"mAP", "top1", "top5", "boxes", "classes"}

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["SEED"] == 7 and config["MODEL"]["WEIGHTS"] == ""


def test_eval_only_reproduces_the_saved_runs_numbers(run, data):
    before = eval_files(run)["iter_0000006.json"]["datasets"]
    assert gridfeats_main(train_args(data, run, "--eval-only")) == 0
    again = json.loads((run / "eval" / "eval_only.json").read_text())
    assert again["weights"].endswith("model_final.pth")
    assert again["datasets"] == before


def test_an_existing_run_is_not_overwritten_without_resume(run, data, capsys):
    assert gridfeats_main(train_args(data, run)) == 2
    assert "--resume" in capsys.readouterr().err


def test_kill_9_then_resume_gives_bit_identical_final_weights(run, data, tmp_path):
    """Killed after step 4 (a checkpoint was written after step 3): the resumed run redoes step
    4 from the saved model, optimizer, scheduler, data position and random generators."""
    killed = tmp_path / "killed"
    assert forked(train_args(data, killed), {KILL_ENV: "4"}) == -signal.SIGKILL
    assert not (killed / "model_final.pth").exists()
    assert load_training_state(killed / "last.pt")["iteration"] == 3

    assert gridfeats_main(train_args(data, killed, "--resume")) == 0
    a, b = final_weights(run), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _log(killed) == _log(run)
    assert eval_files(killed) == eval_files(run)


def test_a_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = gridfeats_main(
        [
            "train-detector",
            "--config",
            "R-50-grid",
            "--out",
            str(tmp_path / "x"),
            "--device",
            "cpu",
            "MODEL.WEIGHTS",
            "",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "visual_genome_train" in err and "json" in err


def test_a_weights_url_is_refused_rather_than_downloaded(data, tmp_path, capsys):
    args = train_args(data, tmp_path / "x", opts=["MODEL.WEIGHTS", "detectron2://x/R-50.pkl"])
    assert gridfeats_main(args) == 2
    assert "never downloads" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_of_a_fresh_interpreter_then_resume_gives_bit_identical_weights(run, data, tmp_path):
    import subprocess
    import sys

    from tests.training.helpers import REPO, subprocess_env

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "gridfeats"]
    done = subprocess.run(
        [*command, *train_args(data, killed)],
        cwd=REPO,
        env=subprocess_env(**{KILL_ENV: "5"}),
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    resumed = subprocess.run(
        [*command, *train_args(data, killed, "--resume")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_weights(run), final_weights(killed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dataloader_workers_train_the_same_weights(run, data, tmp_path):
    """The mapper's draws depend on the stream position only, not on which worker maps (and the
    mapped ``Instances`` survive the trip back from the workers)."""
    workers = tmp_path / "workers"
    assert gridfeats_main(train_args(data, workers, opts=["DATALOADER.NUM_WORKERS", "2"])) == 0
    a, b = final_weights(run), final_weights(workers)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_datasets_image_root_sets_where_the_json_images_are(data, tmp_path, capsys):
    """Images kept apart from the annotations (e.g. VG's images/ and a json elsewhere) are found
    through DATASETS.IMAGE_ROOT; a wrong root is refused before training starts."""
    import shutil

    from gridfeats.config import get_cfg
    from gridfeats.engine.detection import load_datasets

    annotations = tmp_path / "ann"
    annotations.mkdir()
    moved = shutil.copy(data["train_instances"], annotations / "train.json")
    images = shutil.copytree(data["images"], tmp_path / "pixels")
    cfg = get_cfg(str(TINY_CONFIG), ["DATASETS.TRAIN", f"('{moved}',)"])
    _, default_records, _ = load_datasets(cfg, "TRAIN")[0]
    assert not any(Path(r["file_name"]).is_file() for r in default_records)  # ann/../images

    cfg = get_cfg(
        str(TINY_CONFIG), ["DATASETS.TRAIN", f"('{moved}',)", "DATASETS.IMAGE_ROOT", str(images)]
    )
    _, records, _ = load_datasets(cfg, "TRAIN")[0]
    assert records and all(Path(r["file_name"]).parent == images for r in records)
    assert all(Path(r["file_name"]).is_file() for r in records)

    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", "1", "DATASETS.IMAGE_ROOT", str(images)]
    assert gridfeats_main(train_args({**data, "train_instances": moved}, out, opts=opts)) == 0
    assert (out / "model_final.pth").is_file()

    opts = ["DATASETS.IMAGE_ROOT", str(tmp_path / "nowhere")]
    assert gridfeats_main(train_args(data, tmp_path / "bad", opts=opts)) == 2
    assert "DATASETS.IMAGE_ROOT" in capsys.readouterr().err
