"""COCO box AP with pycocotools, ground truth built in memory from the training records.

Detectron2's ``COCOEvaluator`` on a dataset given as records (``convert_to_coco_dict``): images
keep their ``image_id``, every annotation becomes a COCO annotation whose ``category_id`` is
the dataset id of its contiguous class (the reverse of ``dataset_id_to_contiguous_id``), whose
``bbox`` is ``[x, y, w, h]`` rounded to 3 decimals and whose ``area`` is the box area.
Detections are turned into COCO results the way ``instances_to_coco_json`` does (XYXY -> XYWH,
contiguous class -> dataset id). The metrics are pycocotools' ``stats[:6]``; unlike Detectron2
(which multiplies by 100) they stay fractions in [0, 1], so a perfect detector scores 1.0.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from gridfeats.data.detection_dataset import DetectionMetadata

#: The names of ``COCOeval.stats[:6]`` (box AP at IoU .50:.95, .50, .75; small, medium, large).
BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def records_to_coco(
    records: Sequence[Mapping[str, Any]], metadata: DetectionMetadata
) -> Dict[str, Any]:
    """A COCO detection document of ``records`` (``load_coco_with_attributes_json``'s dicts)."""
    reverse = {k: dataset_id for dataset_id, k in metadata.dataset_id_to_contiguous_id.items()}
    images, annotations = [], []
    for record in records:
        images.append(
            {
                "id": record["image_id"],
                "width": int(record["width"]),
                "height": int(record["height"]),
                "file_name": str(record.get("file_name", "")),
            }
        )
        for ann in record.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": record["image_id"],
                    "bbox": [round(v, 3) for v in (x, y, w, h)],
                    "area": float(max(w, 0.0) * max(h, 0.0)),
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    "category_id": int(reverse[int(ann["category_id"])]),
                }
            )
    categories = [
        {"id": int(reverse[k]), "name": name} for k, name in enumerate(metadata.thing_classes)
    ]
    return {
        "info": {"description": "ground truth built from the dataset records"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def detections_to_coco_results(
    image_id: Any,
    boxes_xyxy: Any,
    scores: Any,
    classes: Any,
    metadata: DetectionMetadata,
) -> List[Dict[str, Any]]:
    """COCO result rows of one image's detections (original-image pixels, contiguous classes)."""
    reverse = {k: dataset_id for dataset_id, k in metadata.dataset_id_to_contiguous_id.items()}
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    rows = []
    for (x0, y0, x1, y1), score, k in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
        rows.append(
            {
                "image_id": image_id,
                "category_id": int(reverse[int(k)]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return rows


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def coco_box_ap(
    ground_truth: Mapping[str, Any],
    results: Iterable[Mapping[str, Any]],
    max_dets_per_image: Optional[int] = None,
    per_category: bool = False,
) -> Dict[str, float]:
    """pycocotools box AP of ``results`` against the ``ground_truth`` document.

    Returns ``AP, AP50, AP75, APs, APm, APl`` as fractions (pycocotools gives -1 where a range
    has no ground truth; that becomes NaN, as in Detectron2) and, with ``per_category``,
    ``AP-<class name>`` per category. No detections at all score 0 against existing ground truth
    (pycocotools' ``loadRes`` refuses an empty list, so an empty result set is built directly).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = [dict(r) for r in results]
    with _quiet():
        gt = COCO()
        gt.dataset = copy.deepcopy(dict(ground_truth))
        gt.createIndex()
        if results:
            dt = gt.loadRes(results)
        else:
            dt = COCO()
            dt.dataset = {
                "images": list(gt.dataset["images"]),
                "categories": copy.deepcopy(gt.dataset["categories"]),
                "annotations": [],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if max_dets_per_image is not None and max_dets_per_image != 100:
            evaluator.params.maxDets = [1, 10, int(max_dets_per_image)]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {
        name: (float(v) if v >= 0 else math.nan)
        for name, v in zip(BOX_METRICS, evaluator.stats[:6])
    }
    if per_category:
        precision = evaluator.eval["precision"]  # [iou, recall, category, area, max dets]
        for index, cat_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, index, 0, -1]
            values = values[values > -1]
            name = gt.cats[cat_id]["name"]
            metrics[f"AP-{name}"] = float(values.mean()) if values.size else math.nan
    return metrics
