"""Two CPU ranks (gloo, DDP) train the same detector as one process with the same global batch.

Why a special setting: Detectron2's losses are normalised over the images of one process
(docs/training.md), and its samplers draw ``torch.randperm`` from each rank's own generator, so in
general two ranks of one image are *not* one process of two. Here every normaliser is fixed per
image and nothing is sampled, so DDP's gradient average must equal the one-process gradient up to
float summation order:

* RPN: ``BATCH_SIZE_PER_IMAGE`` larger than the anchor count, so every labelled anchor is used
  (its normaliser is ``BATCH_SIZE_PER_IMAGE x images`` anyway);
* ROI heads: every image has exactly two objects, ``POST_NMS_TOPK_TRAIN`` proposals are always
  available, all proposals are used, and ``IOU_THRESHOLDS (1.0,)`` makes the appended ground-truth
  boxes the only foreground, so the ROI count, the foreground count and the attribute loss's
  ``n_valid`` are the same in every image;
* every image has the same size, so the one process's batch needs no padding (padding changes
  the features near the bottom/right borders);
* no aspect-ratio grouping, so rank r's image is the one process's r-th image of each batch;
  FrozenBN has no batch statistics to synchronise.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from gridfeats.engine import load_training_state, read_metrics
from tests.training.helpers import final_weights, forked, free_port, train_args

EXACT_NORMALISERS = [
    "DATALOADER.ASPECT_RATIO_GROUPING",
    "False",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "100000",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "16",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "512",
    "MODEL.ROI_HEADS.IOU_THRESHOLDS",
    "(1.0,)",
    "SOLVER.MAX_ITER",
    "3",
    "SOLVER.CHECKPOINT_PERIOD",
    "0",
    "DATASETS.TEST",
    "()",
]


SIDE = 128


@pytest.fixture(scope="module")
def two_object_data(data, tmp_path_factory):
    """The synthetic train split's images with two or more objects, stretched to 128x128, with
    their first two objects (boxes scaled along)."""
    root = tmp_path_factory.mktemp("two_objects")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    source = json.loads(data["train_instances"].read_text())
    by_image = {}
    for ann in source["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    images, annotations = [], []
    for image in source["images"]:
        anns = by_image.get(image["id"], [])
        if len(anns) < 2:
            continue
        sx, sy = SIDE / image["width"], SIDE / image["height"]
        with Image.open(data["images"] / image["file_name"]) as pixels:
            name = f"{image['id']:06d}.png"
            pixels.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR).save(root / "images" / name)
        images.append({**image, "file_name": name, "width": SIDE, "height": SIDE})
        for ann in anns[:2]:
            x, y, w, h = ann["bbox"]
            annotations.append({**ann, "bbox": [x * sx, y * sy, w * sx, h * sy]})
    assert len(images) >= 2
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps({**source, "images": images, "annotations": annotations}))
    return {**data, "train_instances": path}


def _initial_weights(run):
    """The seeded initialisation both runs started from (SEED from the run's config)."""
    from gridfeats.config import get_cfg
    from gridfeats.engine import seed_all_rngs
    from gridfeats.modeling.build import build_model

    cfg = get_cfg(run / "config.yaml")
    seed_all_rngs(cfg.SEED)
    return build_model(cfg).state_dict()


def _losses(run):
    return [
        {k: v for k, v in r.items() if k.startswith("loss")}
        for r in read_metrics(run / "metrics.jsonl")
        if r["kind"] == "train"
    ]


def test_two_cpu_ranks_equal_one_process_with_the_same_global_batch(two_object_data, tmp_path):
    """The ranks are forked from this process (no interpreter start-up each)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = train_args(two_object_data, single, opts=EXACT_NORMALISERS)
    assert forked(args) == 0

    port = str(free_port())
    import multiprocessing

    def rank_main(rank: int) -> None:
        from gridfeats.cli import main

        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        os._exit(main(train_args(two_object_data, ddp, opts=EXACT_NORMALISERS)))

    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=rank_main, args=(r,)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]

    assert len(load_training_state(ddp / "last.pt")["rng"]) == 2  # both ranks' generators
    a, b = final_weights(ddp), final_weights(single)
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    init = _initial_weights(single)
    moved = [n for n in a if not torch.allclose(a[n], init[n], rtol=1e-3, atol=1e-5)]
    assert len(moved) > 20  # the steps really trained (the comparison is not of untouched weights)
    for got, want in zip(_losses(ddp), _losses(single), strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)  # averaged over the two ranks


@pytest.mark.slow
def test_two_torchrun_cpu_ranks_equal_one_process_with_the_same_global_batch(
    two_object_data, tmp_path
):
    import subprocess
    import sys

    from tests.training.helpers import REPO, subprocess_env

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert forked(train_args(two_object_data, single, opts=EXACT_NORMALISERS)) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    done = subprocess.run(
        [*launcher, "-m", "gridfeats", *train_args(two_object_data, ddp, opts=EXACT_NORMALISERS)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = final_weights(ddp), final_weights(single)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
