"""``gridfeats demo``: train -> cache -> extract -> draw, on a tiny detector by default; the shipped
demo detector's quality targets in the slow case."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from gridfeats.cli import main as gridfeats_main
from gridfeats.data.image_io import read_image
from gridfeats.demo import (
    _COLOURS,
    BOXES_DRAWN,
    DRAW_MIN_SCORE,
    demo_detector,
    detection_labels,
    draw_regions,
    pick_drawn,
)
from gridfeats.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")

# The demo config shrunk to seconds: 2-wide stages, tiny inputs, 2 iterations. Every step of the
# demo still runs (training on the engine, evaluation, cache, extraction, drawing).
TINY = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "4",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "8",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "2",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "16",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",  # an untrained model scores low: keep boxes to draw
    "0.0",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
]


def _demo(out, cache, *extra):
    return gridfeats_main(
        [
            "demo",
            "--out",
            str(out),
            "--num-images",
            "2",
            "--workers",
            "0",
            "--train-images",
            "6",
            "--cache-dir",
            str(cache),
            *extra,
        ]
    )


def test_demo_trains_caches_extracts_and_draws(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    assert _demo(out, cache, *TINY) == 0
    printed = capsys.readouterr().out
    assert "demo detector trained in" in printed
    assert "shortest edge 64, longest at most 96" in printed
    runs = sorted((cache / "demo-detector").glob("run-*"))
    assert len(runs) == 1
    final = runs[0] / "model_final.pth"
    assert final.is_file() and (runs[0] / "metrics.jsonl").is_file()
    assert "box AP50" in printed and "attribute top-1" in printed

    grid, region = FeatureStore(str(out / "grid.h5")), FeatureStore(str(out / "region.h5"))
    assert grid.mode == "grid" and sorted(grid.ids) == ["1", "2"]
    assert region.mode == "region" and sorted(region.ids) == ["1", "2"]
    assert region.meta.weights_sha256 != ""  # extracted with the trained weights
    source = read_image(str(out / "data" / "images" / "000001.jpg"))
    drawn = np.asarray(Image.open(out / "detections.png").convert("RGB"))
    assert drawn.shape == source.shape
    # boxes were drawn: the changed pixels are the box palette or the labels' black text
    changed = np.any(drawn != source, axis=-1)
    palette = np.array([*_COLOURS, (0, 0, 0)], dtype=np.uint8)
    in_palette = np.all(drawn[changed][:, None, :] == palette[None], axis=-1).any(axis=1)
    assert in_palette.sum() > 100 and in_palette.mean() > 0.5  # the rest: anti-aliased text
    assert "4/4 drew the" in printed

    # A second run with the same config and data reuses the cached detector: no new training.
    stamp = final.stat().st_mtime_ns
    assert _demo(out, cache, *TINY) == 0
    printed = capsys.readouterr().out
    assert "reused from the cache" in printed and "trained in" in printed
    assert sorted((cache / "demo-detector").glob("run-*")) == runs
    assert final.stat().st_mtime_ns == stamp

    # Another config is another cache entry (trained anew), on the same cached data.
    other = demo_detector(
        opts=[*TINY[:-4], "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "1"],
        cache_dir=cache,
        train_images=6,
        log=False,
    )
    assert not other.cached and other.run_dir not in runs and other.weights.is_file()
    assert len(list((cache / "demo-detector").glob("data-*"))) == 1


def test_demo_without_training_keeps_the_random_init(tmp_path, capsys):
    out = tmp_path / "demo"
    code = gridfeats_main(
        [
            "demo",
            "--out",
            str(out),
            "--num-images",
            "2",
            "--workers",
            "0",
            "--no-train",
            *TINY,
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "seeded random initialisation" in printed.out
    assert FeatureStore(str(out / "region.h5")).meta.weights_sha256 == ""
    assert (out / "detections.png").is_file()


def test_pick_drawn_keeps_confident_detections_best_first():
    scores = np.array([0.3, 0.9, DRAW_MIN_SCORE, 0.7, 0.1])
    assert pick_drawn(scores).tolist() == [1, 3, 2]
    # an untrained model: nothing passes, the best BOXES_DRAWN are drawn instead
    weak = np.linspace(0.01, 0.2, BOXES_DRAWN + 3)
    assert pick_drawn(weak).tolist() == list(range(BOXES_DRAWN + 2, 2, -1))


def test_detection_labels_name_attributes_class_and_score():
    detections = {
        "boxes": np.zeros((2, 4)),
        "scores": np.array([0.987, 0.5]),
        "classes": np.array([1, 0]),
        "attr_scores": np.array([[0.05, 0.45, 0.5], [0.9, 0.05, 0.05]]),
    }
    labels = detection_labels(detections, ["circle", "square"], ["red", "small", "large"])
    assert labels == ["small large square 0.99", "red circle 0.50"]


def test_draw_regions_outlines_each_box_in_its_colour():
    image = np.full((60, 80, 3), 128, dtype=np.uint8)
    canvas = np.asarray(
        draw_regions(
            image, np.array([[10.0, 30.0, 50.0, 55.0], [5, 5, 20, 20]]), ["a 0.9", "b 0.5"]
        )
    )
    assert tuple(canvas[55, 30]) == _COLOURS[0]  # bottom edge of box 0
    assert tuple(canvas[12, 20]) == _COLOURS[1]  # right edge of box 1
    assert tuple(canvas[45, 30]) == (128, 128, 128)  # inside box 0, below its label: untouched


def test_demo_refuses_bad_arguments(tmp_path, capsys):
    assert gridfeats_main(["demo", "--out", str(tmp_path), "--num-images", "0"]) == 2
    assert "--num-images" in capsys.readouterr().err
    code = gridfeats_main(
        ["demo", "--out", str(tmp_path), "--train-images", "1", "--cache-dir", str(tmp_path)]
    )
    assert code == 2
    assert "at least 2 training images" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_demo_detector_reaches_its_targets(tmp_path):
    """The full demo detector (configs/demo-synthetic.yaml, a few CPU minutes): held-out COCO box
    AP50 >= 0.8 and AP >= 0.5, attribute top-1 on ground-truth boxes >= 0.9."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    trained = demo_detector(cache_dir=tmp_path, log=False)
    m = trained.metrics
    assert m["bbox/AP50"] >= 0.8, m
    assert m["bbox/AP"] >= 0.5, m
    assert m["attr/top1"] >= 0.9, m
