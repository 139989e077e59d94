"""Evaluate a detector on a detection dataset: COCO box AP and attribute metrics.

The detector is a :class:`gridfeats.Detector` (``Detector(cfg, weights=...)`` for a saved model,
``Detector.from_model(model, cfg)`` for the one being trained), and every image goes through its
own paths: :meth:`Detector.prepare` (the test-time reader and resize) and
:meth:`Detector.detect_batch` (Detectron2 inference with the configured thresholds), so the boxes
scored here are exactly those that ``gridfeats extract`` writes.

The attribute metrics (:mod:`gridfeats.evaluation.attributes`) read the attribute head at the
ground-truth boxes: the same backbone forward on the prepared image, the box head applied at each
ground-truth box (mapped into network-input pixels as the train mapper maps boxes), and the
attribute probabilities for the ground-truth class, i.e. the computation ``detect_batch`` does for
its own detections, with the detector's error taken out.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from gridfeats.data.detection_dataset import DetectionMetadata
from gridfeats.data.detection_mapper import transform_boxes
from gridfeats.evaluation.attributes import attribute_metrics
from gridfeats.evaluation.coco import coco_box_ap, detections_to_coco_results, records_to_coco
from gridfeats.precision import autocast

logger = logging.getLogger(__name__)


def _gt_boxes_input(record: Mapping[str, Any], prepared) -> np.ndarray:
    xywh = np.array([a["bbox"] for a in record["annotations"]], dtype=np.float64).reshape(-1, 4)
    return transform_boxes(xywh, prepared.orig_hw, prepared.input_hw, flip=False)


def gt_box_attribute_probs(detector, prepared, boxes_input: np.ndarray, classes) -> torch.Tensor:
    """Attribute probabilities ``[N, A]`` (CPU float32) of the ground-truth boxes of one image.

    ``boxes_input``: ``[N, 4]`` XYXY in network-input pixels; ``classes``: their contiguous classes.
    """
    model = detector.model
    heads = model.roi_heads
    with torch.inference_mode(), autocast(detector.precision, detector.device):
        images = model.normalize([prepared.image])
        if getattr(detector, "fast", False):
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        features = model.backbone(images.tensor)
        boxes = torch.as_tensor(boxes_input, dtype=torch.float32, device=detector.device)
        feats = heads.box_features(features, [boxes]).float()
        labels = torch.as_tensor(classes, dtype=torch.int64, device=detector.device)
        return heads.attribute_probs(feats, labels).float().cpu()


def evaluate_detector(
    detector,
    records: Sequence[Mapping[str, Any]],
    metadata: DetectionMetadata,
    progress: bool = False,
    description: str = "eval",
) -> Dict[str, Any]:
    """``{"bbox": {AP, AP50, AP75, APs, APm, APl, AP-<class>...}, "attributes": {...}}``.

    ``attributes`` is present when the detector has an attribute head and some ground-truth box
    carries attribute ids. Box AP is over the dataset's classes (pycocotools, fractions).
    """
    heads = detector.model.roi_heads
    with_attributes = bool(getattr(heads, "attribute_on", False))
    results: List[Dict[str, Any]] = []
    attr_probs: List[torch.Tensor] = []
    attr_labels: List[List[int]] = []
    for record in tqdm(records, desc=description, disable=not progress, leave=False):
        prepared = detector.prepare(record["file_name"])
        if tuple(prepared.orig_hw) != (int(record["height"]), int(record["width"])):
            raise ValueError(
                f"{record['file_name']}: image is {prepared.orig_hw[1]}x{prepared.orig_hw[0]} "
                f"but the json says {record['width']}x{record['height']}"
            )
        detections = detector.detect_batch([prepared])[0]
        results += detections_to_coco_results(
            record["image_id"],
            detections.pred_boxes.cpu().numpy(),
            detections.scores.cpu().numpy(),
            detections.pred_classes.cpu().numpy(),
            metadata,
        )
        annotations = [a for a in record["annotations"] if a.get("iscrowd", 0) == 0]
        if with_attributes and annotations:
            kept = {**record, "annotations": annotations}
            probs = gt_box_attribute_probs(
                detector,
                prepared,
                _gt_boxes_input(kept, prepared),
                [a["category_id"] for a in annotations],
            )
            attr_probs.append(probs)
            attr_labels += [list(a.get("attribute_ids") or []) for a in annotations]
    metrics: Dict[str, Any] = {
        "bbox": coco_box_ap(
            records_to_coco(records, metadata),
            results,
            max_dets_per_image=int(detector.cfg.TEST.DETECTIONS_PER_IMAGE),
            per_category=True,
        )
    }
    if attr_probs and any(attr_labels):
        metrics["attributes"] = attribute_metrics(torch.cat(attr_probs).numpy(), attr_labels)
    metrics["images"] = len(records)
    metrics["detections"] = len(results)
    return metrics


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"bbox": {"AP": x}}`` -> ``{"bbox/AP": x}`` (Detectron2's storage names), numbers only."""
    flat: Dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def summary_line(metrics: Mapping[str, Any], name: Optional[str] = None) -> str:
    """One printable line: box AP/AP50/AP75 and the attribute numbers."""
    bbox = metrics.get("bbox", {})
    parts = [f"{k} {bbox[k]:.4f}" for k in ("AP", "AP50", "AP75") if k in bbox]
    attrs = metrics.get("attributes", {})
    parts += [f"attr {k} {attrs[k]:.4f}" for k in ("mAP", "top1", "top5") if k in attrs]
    return (f"{name}: " if name else "") + ", ".join(parts)
