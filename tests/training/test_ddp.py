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

``SOLVER.RANK_INVARIANT`` lifts the first two restrictions: every image is sampled from a
generator seeded from its global stream position and the ROI losses are normalised over all
ranks, so the equality holds with real subsampling and varying object counts (the last tests).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from gridfeats.engine import load_training_state, read_metrics
from tests.training.helpers import final_weights, forked, free_port, train_args

#: Three iterations, no checkpoints, no evaluation: every DDP comparison's run length.
SHORT_RUN = ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "0", "DATASETS.TEST", "()"]

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
    *SHORT_RUN,
]


SIDE = 128


def _square_data(data, root, keep=2, unattributed_every=0):
    """The synthetic train split's images with two or more objects, stretched to 128x128, with
    their first ``keep`` objects (``None``: all; boxes scaled along); with
    ``unattributed_every = k`` every k-th kept object loses its attribute ids."""
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
        for ann in anns[:keep]:
            x, y, w, h = ann["bbox"]
            ann = {**ann, "bbox": [x * sx, y * sy, w * sx, h * sy]}
            if unattributed_every and len(annotations) % unattributed_every == 0:
                ann["attribute_ids"] = []
            annotations.append(ann)
    assert len(images) >= 2
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps({**source, "images": images, "annotations": annotations}))
    return {**data, "train_instances": path}


@pytest.fixture(scope="module")
def two_object_data(data, tmp_path_factory):
    """Square images with their first two objects (see ``_square_data``)."""
    return _square_data(data, tmp_path_factory.mktemp("two_objects"))


@pytest.fixture(scope="module")
def all_object_data(data, tmp_path_factory):
    """Square images with all their objects (2 to 6 per image), every third without attributes,
    so the foreground and attributed-row counts differ between images."""
    return _square_data(data, tmp_path_factory.mktemp("all_objects"), None, 3)


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


def _two_ranks(data, out, opts):
    """``train-detector`` as two gloo ranks forked from this process (no interpreter start-up
    each); their exit codes."""
    import multiprocessing

    port = str(free_port())

    def rank_main(rank: int) -> None:
        from gridfeats.cli import main

        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        os._exit(main(train_args(data, out, opts=opts)))

    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=rank_main, args=(r,)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    return [p.exitcode for p in ranks]


def test_two_cpu_ranks_equal_one_process_with_the_same_global_batch(two_object_data, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = train_args(two_object_data, single, opts=EXACT_NORMALISERS)
    assert forked(args) == 0
    assert _two_ranks(two_object_data, ddp, EXACT_NORMALISERS) == [0, 0]

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


# Real sampling: 32 of the hundreds of labelled anchors per image; 16 of the 12 + 2..6 gt
# proposals, at most 4 foreground (IoU 0.5), so the foreground is subsampled and the sampled count
# varies with the image; two images per rank, so a rank's batch interleaves with the other's in
# the one process's (positions 0, 2 | 1, 3 vs 0, 1, 2, 3).
SAMPLED = [
    "DATALOADER.ASPECT_RATIO_GROUPING",
    "False",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "12",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "16",
    "SOLVER.IMS_PER_BATCH",
    "4",
    *SHORT_RUN,
]
RANK_INVARIANT = [*SAMPLED, "SOLVER.RANK_INVARIANT", "True"]


def _first_batch_subsamples(data, opts) -> None:
    """One training forward of the setting's first batch really subsamples: some RPN and some ROI
    ``subsample_labels`` call leaves candidates out (so the draws matter), with generators; and
    the ROI normalisers differ between the ranks' halves (items 0, 2 and 1, 3)."""
    import gridfeats.modeling.roi_heads.roi_heads as roi_module
    import gridfeats.modeling.rpn as rpn_module
    from gridfeats.config import get_cfg
    from gridfeats.data.detection_mapper import DetectionTrainMapper
    from gridfeats.data.samplers import build_detection_train_loader
    from gridfeats.engine.detection import training_records
    from gridfeats.modeling.build import build_model
    from gridfeats.modeling.roi_heads.roi_heads import attributed_rows
    from tests.training.helpers import TINY_CONFIG

    cfg = get_cfg(TINY_CONFIG, ["DATASETS.TRAIN", f"('{data['train_instances']}',)", *opts])
    records, _ = training_records(cfg)
    loader = build_detection_train_loader(cfg, records, DetectionTrainMapper.from_config(cfg), 7)
    batch = next(iter(loader))
    assert all(isinstance(x["sampling_seed"], int) for x in batch)
    calls = {"rpn": [], "roi": []}

    def recording(fn, where):
        def wrapper(labels, num, fraction, bg, generator=None):
            pos, neg = fn(labels, num, fraction, bg, generator=generator)
            candidates = int((labels != -1).sum())
            calls[where].append((generator is not None, len(pos) + len(neg) < candidates))
            return pos, neg

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rpn_module, "subsample_labels", recording(rpn_module.subsample_labels, "rpn"))
        mp.setattr(roi_module, "subsample_labels", recording(roi_module.subsample_labels, "roi"))
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        seen = {}
        model.roi_heads.register_forward_hook(lambda m, i, o: seen.update(sampled=o[0]))
        with torch.no_grad():
            model(batch)
    for where in ("rpn", "roi"):
        assert len(calls[where]) == len(batch) and all(g for g, _ in calls[where])
        assert any(dropped for _, dropped in calls[where]), where
    proposals = [len(s) for s in seen["sampled"]]
    fg = [
        (s.gt_classes >= 0) & (s.gt_classes < cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        for s in seen["sampled"]
    ]
    attributed = [attributed_rows(s.gt_attributes[f]) for s, f in zip(seen["sampled"], fg)]
    for per_image in (proposals, attributed):
        assert per_image[0] + per_image[2] != per_image[1] + per_image[3], per_image


def test_rank_invariant_two_cpu_ranks_with_sampling_equal_one_process(all_object_data, tmp_path):
    """``SOLVER.RANK_INVARIANT``: subsampled anchors and proposals, 2 to 6 objects per image and
    unattributed objects (so every normaliser differs between images), still one process's
    weights and logged losses."""
    _first_batch_subsamples(all_object_data, RANK_INVARIANT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert forked(train_args(all_object_data, single, opts=RANK_INVARIANT)) == 0
    assert _two_ranks(all_object_data, ddp, RANK_INVARIANT) == [0, 0]

    a, b = final_weights(ddp), final_weights(single)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    init = _initial_weights(single)
    moved = [n for n in a if not torch.allclose(a[n], init[n], rtol=1e-3, atol=1e-5)]
    assert len(moved) > 20
    got, want = _losses(ddp), _losses(single)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and "loss_attr" in g
        assert g == pytest.approx(w, rel=1e-4, abs=1e-7)


def test_without_rank_invariant_the_same_setting_differs(all_object_data, tmp_path):
    """The control: the same runs with Detectron2's per-rank sampling and normalisers do not give
    one process's weights, so the key is what makes the test above pass."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert forked(train_args(all_object_data, single, opts=SAMPLED)) == 0
    assert _two_ranks(all_object_data, ddp, SAMPLED) == [0, 0]
    a, b = final_weights(ddp), final_weights(single)
    differing = [n for n in a if not torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6)]
    assert len(differing) > 20
    for got, want in zip(_losses(ddp), _losses(single), strict=True):
        assert got != pytest.approx(want, rel=1e-4, abs=1e-7)  # the comparison that passes above


def test_sampling_seeds_follow_the_global_stream_position(all_object_data):
    """Rank r of 2 gets the seeds the one-process batch gives the same images, and nothing else
    of the item changes; without the key the items carry no seed."""
    from gridfeats.config import get_cfg
    from gridfeats.data.samplers import build_detection_train_loader, sampling_seed
    from gridfeats.engine.detection import training_records
    from tests.training.helpers import TINY_CONFIG

    data = ["DATASETS.TRAIN", f"('{all_object_data['train_instances']}',)"]
    cfg = get_cfg(TINY_CONFIG, [*data, *RANK_INVARIANT])
    records, _ = training_records(cfg)

    def mapper(record, rng):
        return {"image_id": record["image_id"], "draw": float(rng.uniform())}

    def batches(c, rank, world):
        loader = build_detection_train_loader(c, records, mapper, 7, rank, world)
        return [
            sorted(map(lambda x: tuple(sorted(x.items())), b)) for _, b in zip(range(3), loader)
        ]

    one = batches(cfg, 0, 1)
    ranks = [batches(cfg, r, 2) for r in range(2)]
    for k in range(3):
        assert sorted(ranks[0][k] + ranks[1][k]) == one[k]
    seeds = [dict(item)["sampling_seed"] for batch in one for item in batch]
    assert len(set(seeds)) == len(seeds) and sampling_seed(7, 0) in seeds
    off = get_cfg(TINY_CONFIG, [*data, *SAMPLED])
    assert all("sampling_seed" not in dict(x) for b in batches(off, 0, 1) for x in b)


def test_rank_invariant_refuses_aspect_ratio_grouping_under_ranks(all_object_data):
    from gridfeats.config import get_cfg
    from gridfeats.engine.detection import (
        DetectionTrainingError,
        check_rank_invariance,
        rank_invariance_warnings,
    )
    from tests.training.helpers import TINY_CONFIG

    grouped = get_cfg(TINY_CONFIG, ["SOLVER.RANK_INVARIANT", "True"])
    assert grouped.DATALOADER.ASPECT_RATIO_GROUPING
    check_rank_invariance(grouped, 1)  # one process is trivially itself
    with pytest.raises(DetectionTrainingError, match="ASPECT_RATIO_GROUPING False"):
        check_rank_invariance(grouped, 2)
    check_rank_invariance(get_cfg(TINY_CONFIG, RANK_INVARIANT), 2)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    warnings = rank_invariance_warnings(grouped, [{"height": 4, "width": 4}], bn, 2)
    assert len(warnings) == 1 and "BatchNorm" in warnings[0]
    sizes = [{"height": 4, "width": 4}, {"height": 4, "width": 5}]
    assert "size" in rank_invariance_warnings(grouped, sizes, torch.nn.Identity(), 2)[0]
    assert rank_invariance_warnings(grouped, sizes, bn, 1) == []
