"""COCO box AP from records: perfect, shifted, swapped and missing detections; id mapping."""

from __future__ import annotations

import json
import math

import pytest

from gridfeats.data.detection_dataset import load_coco_with_attributes_json
from gridfeats.evaluation import coco_box_ap, detections_to_coco_results, records_to_coco


@pytest.fixture
def dataset(tmp_path):
    """Two images, three objects, json category ids 5 and 9 (contiguous classes 0 and 1)."""
    doc = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "height": 200, "width": 300},
            {"id": 11, "file_name": "b.jpg", "height": 200, "width": 300},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "bbox": [10, 20, 100, 80], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 9, "bbox": [150, 30, 60, 120], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 9, "bbox": [40, 40, 120, 100], "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
    }
    path = tmp_path / "annotations" / "x.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    return load_coco_with_attributes_json(path, tmp_path / "images")


def _perfect(records, metadata, shift=0.0, swap=False):
    rows = []
    for r in records:
        boxes = [
            [x + shift, y, x + w + shift, y + h]
            for x, y, w, h in (a["bbox"] for a in r["annotations"])
        ]
        classes = [1 - a["category_id"] if swap else a["category_id"] for a in r["annotations"]]
        rows += detections_to_coco_results(
            r["image_id"], boxes, [0.9] * len(boxes), classes, metadata
        )
    return rows


def test_ground_truth_keeps_ids_and_maps_classes_back_to_dataset_ids(dataset):
    records, metadata = dataset
    gt = records_to_coco(records, metadata)
    assert [i["id"] for i in gt["images"]] == [10, 11]
    assert [(c["id"], c["name"]) for c in gt["categories"]] == [(5, "cat"), (9, "dog")]
    assert [a["category_id"] for a in gt["annotations"]] == [5, 9, 9]
    assert gt["annotations"][0]["bbox"] == [10.0, 20.0, 100.0, 80.0]
    assert gt["annotations"][0]["area"] == 8000.0
    rows = _perfect(records, metadata)
    assert [r["category_id"] for r in rows] == [5, 9, 9]
    assert rows[0]["bbox"] == [10.0, 20.0, 100.0, 80.0]


def test_perfect_detections_score_one(dataset):
    records, metadata = dataset
    metrics = coco_box_ap(records_to_coco(records, metadata), _perfect(records, metadata))
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == pytest.approx(1.0)
    # areas 8000 and 7200 are medium (32^2..96^2), 12000 is large; nothing is small
    assert metrics["APm"] == metrics["APl"] == pytest.approx(1.0)
    assert math.isnan(metrics["APs"])


def test_a_shift_to_iou_0_62_passes_three_of_the_ten_thresholds(dataset):
    records, metadata = dataset
    # One image, one box of width 100 shifted by s: IoU = (100 - s) / (100 + s) = 0.62 -> s = 23.457
    one = [dict(records[0], annotations=records[0]["annotations"][:1])]
    s = 100 * (1 - 0.62) / (1 + 0.62)
    metrics = coco_box_ap(records_to_coco(one, metadata), _perfect(one, metadata, shift=s))
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.3)  # IoU thresholds 0.50, 0.55, 0.60 of 0.50:0.95


def test_swapped_classes_and_no_detections_score_zero(dataset):
    records, metadata = dataset
    gt = records_to_coco(records, metadata)
    assert coco_box_ap(gt, _perfect(records, metadata, swap=True))["AP"] == 0.0
    assert coco_box_ap(gt, [])["AP"] == 0.0


def test_per_category_ap(dataset):
    records, metadata = dataset
    rows = [r for r in _perfect(records, metadata) if r["category_id"] == 5]
    metrics = coco_box_ap(records_to_coco(records, metadata), rows, per_category=True)
    assert metrics["AP-cat"] == pytest.approx(1.0) and metrics["AP-dog"] == 0.0
    assert metrics["AP"] == pytest.approx(0.5)
