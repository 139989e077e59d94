"""Detector evaluation: COCO box AP (pycocotools) and attribute metrics on ground-truth boxes.

    from gridfeats.evaluation import evaluate_detector
    metrics = evaluate_detector(Detector(cfg, weights="run/model_final.pth"), records, metadata)
    metrics["bbox"]["AP"], metrics["attributes"]["top1"]

``coco``: ground truth from records (Detectron2's ``convert_to_coco_dict``), detections as COCO
results, ``coco_box_ap``; ``attributes``: ``attribute_metrics``; ``detection``: the loop over a
dataset through :class:`gridfeats.Detector`.
"""

from gridfeats.evaluation.attributes import attribute_metrics, average_precision
from gridfeats.evaluation.coco import (
    BOX_METRICS,
    coco_box_ap,
    detections_to_coco_results,
    records_to_coco,
)
from gridfeats.evaluation.detection import evaluate_detector, flatten_metrics, summary_line

__all__ = [
    "BOX_METRICS",
    "attribute_metrics",
    "average_precision",
    "coco_box_ap",
    "detections_to_coco_results",
    "evaluate_detector",
    "flatten_metrics",
    "records_to_coco",
    "summary_line",
]
