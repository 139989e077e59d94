"""``evaluate_detector`` scores what ``Detector.detect_batch`` returns, and the gt-box attribute
pass is the computation ``detect_batch`` does for its own detections."""

from __future__ import annotations

import pytest
import torch

from gridfeats.api import Detector
from gridfeats.config import get_cfg
from gridfeats.data.detection_dataset import load_coco_with_attributes_json
from gridfeats.data.synthetic import make_synthetic
from gridfeats.engine import seed_all_rngs
from gridfeats.evaluation import coco_box_ap, detections_to_coco_results, records_to_coco
from gridfeats.evaluation.detection import evaluate_detector, gt_box_attribute_probs
from gridfeats.modeling.build import build_model
from tests.training.helpers import TINY_CONFIG


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = make_synthetic(tmp_path_factory.mktemp("syn"), 3, seed=1)
    records, metadata = load_coco_with_attributes_json(paths["instances"], paths["images"])
    cfg = get_cfg(TINY_CONFIG)
    seed_all_rngs(0)
    model = build_model(cfg)
    yield cfg, model, records, metadata
    torch.set_num_threads(threads)


def test_wrapped_model_detects_like_a_detector_built_from_its_saved_weights(setup, tmp_path):
    cfg, model, records, _ = setup
    path = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    wrapped = Detector.from_model(model, cfg)
    loaded = Detector(cfg, weights=path)
    assert not model.training and any(p.requires_grad for p in model.parameters())
    for record in records:
        a = wrapped.detect_batch([wrapped.prepare(record["file_name"])])[0]
        b = loaded.detect_batch([loaded.prepare(record["file_name"])])[0]
        for field in ("pred_boxes", "scores", "pred_classes", "attr_probs"):
            assert torch.equal(a.get(field), b.get(field)), field


def test_evaluation_scores_the_detectors_own_detections(setup):
    cfg, model, records, metadata = setup
    detector = Detector.from_model(model, cfg)
    metrics = evaluate_detector(detector, records, metadata)
    rows = []
    for record in records:
        det = detector.detect_batch([detector.prepare(record["file_name"])])[0]
        rows += detections_to_coco_results(
            record["image_id"], det.pred_boxes, det.scores, det.pred_classes, metadata
        )
    expected = coco_box_ap(records_to_coco(records, metadata), rows, per_category=True)
    assert metrics["bbox"] == pytest.approx(expected, nan_ok=True)
    assert metrics["detections"] == len(rows) > 0 and metrics["images"] == len(records)
    assert metrics["attributes"]["boxes"] == sum(len(r["annotations"]) for r in records)


def test_gt_box_attribute_pass_equals_detect_batch_at_the_same_boxes(setup):
    cfg, model, records, _ = setup
    detector = Detector.from_model(model, cfg)
    prepared = detector.prepare(records[0]["file_name"])
    det = detector.detect_batch([prepared])[0]
    assert len(det) > 0
    probs = gt_box_attribute_probs(
        detector, prepared, det.pred_boxes_input.numpy(), det.pred_classes
    )
    torch.testing.assert_close(probs, det.attr_probs, rtol=1e-5, atol=1e-7)
