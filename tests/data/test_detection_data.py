"""Training data: COCO-with-attributes records, the train mapper, the resumable grouped stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gridfeats.config import get_cfg
from gridfeats.data.detection_dataset import (
    DetectionDatasetError,
    filter_images_without_annotations,
    load_coco_with_attributes_json,
)
from gridfeats.data.detection_mapper import DetectionTrainMapper, transform_boxes
from gridfeats.data.preprocess import prepare_rgb
from gridfeats.data.samplers import (
    TrainBatchSampler,
    build_detection_train_loader,
    training_stream,
)
from gridfeats.data.synthetic import make_synthetic
from gridfeats.data.transforms import resize_shortest_edge_size
from gridfeats.modeling import build_model


def _write_dataset(tmp_path, annotations, categories=None, size=(40, 60)):
    """One 60x40 (w x h) image with a gradient, and a json holding ``annotations``."""
    h, w = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 4
    pixels[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 6
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.fromarray(pixels).save(tmp_path / "images" / "a.png")
    doc = {
        "images": [{"id": 7, "file_name": "a.png", "height": h, "width": w}],
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 10, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return path, pixels


def _ann(i, bbox, cat=10, attrs=None, **kw):
    return {"id": i, "image_id": 7, "category_id": cat, "bbox": bbox, "attribute_ids": attrs, **kw}


def test_records_map_categories_by_rank_and_keep_attributes(tmp_path):
    path, _ = _write_dataset(
        tmp_path, [_ann(1, [1, 2, 10, 20], 10, [4, 0]), _ann(2, [0, 0, 5, 5], 3, [])]
    )
    records, meta = load_coco_with_attributes_json(path, tmp_path / "images")
    assert meta.thing_classes == ("cat", "dog") and meta.dataset_id_to_contiguous_id == {
        3: 0,
        10: 1,
    }
    (rec,) = records
    assert rec["file_name"] == str(tmp_path / "images" / "a.png") and rec["image_id"] == 7
    assert [a["category_id"] for a in rec["annotations"]] == [1, 0]
    assert rec["annotations"][0]["attribute_ids"] == [4, 0]
    assert "attribute_ids" not in rec["annotations"][1]  # empty list: no attributes at all


@pytest.mark.parametrize(
    "annotations, reason",
    [
        ([_ann(1, [0, 0, 5, 5]), _ann(1, [1, 1, 5, 5])], "not unique"),
        ([_ann(1, [0, 0, 5, 5], attrs=list(range(17)))], "MAX_ATTR_PER_INS"),
        ([_ann(1, [0, 0, 5, 5], attrs=[-1])], "integers >= 0"),
        ([_ann(1, [0, 0, 5, 5], ignore=1)], "ignore"),
        ([_ann(1, [0, 0, 5], 10)], "bbox"),
    ],
)
def test_bad_annotations_are_clear_errors(tmp_path, annotations, reason):
    path, _ = _write_dataset(tmp_path, annotations)
    with pytest.raises(DetectionDatasetError, match=reason):
        load_coco_with_attributes_json(path, tmp_path / "images")


def test_filter_empty_drops_images_with_only_crowd_objects():
    records = [
        {"annotations": [{"iscrowd": 1}]},
        {"annotations": []},
        {"annotations": [{"iscrowd": 1}, {"iscrowd": 0}]},
    ]
    assert filter_images_without_annotations(records) == [records[2]]


def test_box_transform_resize_then_flip_in_float64():
    boxes = np.array([[10.0, 4.0, 20.0, 8.0]])  # XYWH in a 40x60 (h x w) image
    out = transform_boxes(boxes, (40, 60), (80, 90), flip=False)
    assert out.tolist() == [[10 * 1.5, 4 * 2.0, 30 * 1.5, 12 * 2.0]]
    flipped = transform_boxes(boxes, (40, 60), (80, 90), flip=True)
    assert flipped.tolist() == [[90 - 45.0, 8.0, 90 - 15.0, 24.0]]


@pytest.mark.parametrize("flip", [False, True])
def test_mapper_resizes_flips_clips_and_drops_empty_objects(tmp_path, flip):
    path, pixels = _write_dataset(
        tmp_path,
        [
            _ann(1, [10, 4, 20, 8], 10, [4, 0]),
            _ann(2, [55, 30, 30, 30], 3, [2]),  # sticks out at the right/bottom: clipped
            _ann(3, [70, 0, 5, 5], 3, [1]),  # entirely right of the image: empty, dropped
            _ann(4, [0, 0, 8, 8], 3, [3], iscrowd=1),  # crowd: dropped
        ],
    )
    records, _ = load_coco_with_attributes_json(path, tmp_path / "images")
    mapper = DetectionTrainMapper([80], 1000, "choice", flip_prob=1.0 if flip else 0.0)
    out = mapper(records[0], np.random.default_rng(0))
    expected = prepare_rgb(pixels, 80, 1000, "BGR").image  # 40x60 -> 80x120
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 80, 120)
    assert torch.equal(out["image"], expected.flip(-1) if flip else expected)
    assert (out["height"], out["width"]) == (40, 60)
    inst = out["instances"]
    assert inst.image_size == (80, 120)
    boxes = [[20.0, 8.0, 60.0, 24.0], [110.0, 60.0, 120.0, 80.0]]
    if flip:
        boxes = [[120 - x1, y0, 120 - x0, y1] for x0, y0, x1, y1 in boxes]
    assert inst.gt_boxes.dtype == torch.float32 and inst.gt_boxes.tolist() == boxes
    assert inst.gt_classes.tolist() == [1, 0]
    assert inst.gt_attributes.shape == (2, 16)
    assert inst.gt_attributes[:, :3].tolist() == [[4, 0, -1], [2, -1, -1]]
    assert (inst.gt_attributes[:, 3:] == -1).all()


def test_mapper_draws_sizes_from_the_given_rng(tmp_path):
    path, _ = _write_dataset(tmp_path, [_ann(1, [10, 4, 20, 8])])
    records, _ = load_coco_with_attributes_json(path, tmp_path / "images")
    mapper = DetectionTrainMapper([30, 50], 1000, "range")
    sides = {
        min(mapper(records[0], np.random.default_rng(s))["image"].shape[1:]) for s in range(12)
    }
    assert sides <= set(range(30, 51)) and len(sides) > 3
    a = mapper(records[0], np.random.default_rng(5))
    b = mapper(records[0], np.random.default_rng(5))
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(a["instances"].gt_boxes, b["instances"].gt_boxes)


def test_mapper_rejects_a_size_mismatch(tmp_path):
    path, _ = _write_dataset(tmp_path, [_ann(1, [10, 4, 20, 8])])
    records, _ = load_coco_with_attributes_json(path, tmp_path / "images")
    records[0]["width"] = 61
    with pytest.raises(DetectionDatasetError, match="json says"):
        DetectionTrainMapper([40], 1000)(records[0], np.random.default_rng(0))


def test_stream_is_detectron2_randperm_epochs_split_over_ranks():
    keys = list(zip(range(12), training_stream(5, seed=3)))
    g = torch.Generator()
    g.manual_seed(3)
    expected = torch.cat([torch.randperm(5, generator=g) for _ in range(3)])[:12].tolist()
    assert [k[1][1] for k in keys] == expected and [k[1][0] for k in keys] == list(range(12))
    r1 = [k for _, k in zip(range(6), training_stream(5, seed=3, rank=1, world_size=2))]
    assert [p for p, _ in r1] == [1, 3, 5, 7, 9, 11] and [i for _, i in r1] == expected[1::2]


def test_grouped_batches_are_homogeneous_and_resume_exactly():
    groups = [0, 1, 1, 0, 0, 1, 0]
    sampler = TrainBatchSampler(7, 2, seed=1, groups=groups)
    batches = [b for _, b in zip(range(10), sampler)]
    for batch in batches:
        assert len(batch) == 2 and len({groups[i] for _, i in batch}) == 1
    positions = [p for b in batches for p, _ in b]
    assert len(set(positions)) == len(positions)  # no sample is used twice
    resumed = TrainBatchSampler(7, 2, seed=1, groups=groups, start_batch=4)
    assert [b for _, b in zip(range(6), resumed)] == batches[4:]


def test_loader_on_make_synthetic_is_a_function_of_the_seed(tmp_path):
    paths = make_synthetic(tmp_path / "syn", num_images=4, seed=0)
    records, meta = load_coco_with_attributes_json(paths["instances"], paths["images"])
    assert len(records) == 4 and len(meta.attribute_classes) > 0
    cfg = get_cfg(
        "R-50-grid",
        opts=["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
              "INPUT.MIN_SIZE_TRAIN", "(64, 96)", "INPUT.MAX_SIZE_TRAIN", "160"],
    )  # fmt: skip
    mapper = DetectionTrainMapper.from_config(cfg)

    def first_batches(start, n):
        loader = build_detection_train_loader(cfg, records, mapper, seed=7, start_batch=start)
        return [b for _, b in zip(range(n), loader)]

    run = first_batches(0, 3)
    assert all(len(b) == 2 for b in run)
    for batch in run:
        assert len({d["width"] > d["height"] for d in batch}) == 1  # aspect-ratio grouping
        for d in batch:
            sizes = {resize_shortest_edge_size(d["height"], d["width"], s, 160) for s in (64, 96)}
            assert d["image"].shape[0] == 3 and tuple(d["image"].shape[1:]) in sizes
            assert d["instances"].gt_attributes.shape[1] == cfg.INPUT.MAX_ATTR_PER_INS
    again = first_batches(2, 1)[0]
    assert [d["image_id"] for d in again] == [d["image_id"] for d in run[2]]
    for a, b in zip(again, run[2]):
        assert torch.equal(a["image"], b["image"])


def test_a_loader_batch_trains_the_detector(tmp_path, one_thread):
    paths = make_synthetic(tmp_path / "syn", num_images=2, seed=1)
    records, meta = load_coco_with_attributes_json(paths["instances"], paths["images"])
    opts = [
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.ASPECT_RATIO_GROUPING", "False", "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "160", "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "16", "MODEL.RESNETS.WIDTH_PER_GROUP", "4",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(meta.thing_classes)),
        "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES", str(len(meta.attribute_classes)),
        "MODEL.ROI_BOX_HEAD.FC_DIM", "16",
    ]  # fmt: skip
    cfg = get_cfg("R-50-grid", opts=opts)
    loader = build_detection_train_loader(cfg, records, DetectionTrainMapper.from_config(cfg), 0)
    batch = next(iter(loader))
    torch.manual_seed(0)
    model = build_model(cfg)
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_attr", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_attr"] > 0
