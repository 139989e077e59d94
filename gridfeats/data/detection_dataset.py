"""Training records from a COCO-format json with grid-feats-vqa's ``attribute_ids``.

The semantics are grid-feats-vqa's ``load_coco_with_attributes_json`` (detectron2-compat.md 7.4):
images in sorted id order, category ids mapped to their rank (contiguous 0-based classes),
annotation ids unique, ``ignore`` must be 0, ``attribute_ids`` kept only when non-empty.
Records are plain dicts (``file_name``, ``height``, ``width``, ``image_id``, ``annotations``), so
they pickle cheaply into DataLoader workers. ``gridfeats make-synthetic``'s ``instances.json``
loads as it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

from gridfeats.errors import GridfeatsError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class DetectionDatasetError(GridfeatsError, ValueError):
    """A detection json that cannot be trained on; ``reason`` says why, ``source`` which file."""

    def __init__(self, reason: str, source: str = ""):
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source


@dataclass(frozen=True)
class DetectionMetadata:
    """What the records' integer labels mean: ``thing_classes[k]`` is class k's name and
    ``dataset_id_to_contiguous_id`` maps json category ids to k."""

    thing_classes: Tuple[str, ...]
    dataset_id_to_contiguous_id: Dict[int, int]
    attribute_classes: Tuple[str, ...] = ()


def load_coco_with_attributes_json(
    json_file: PathLike, image_root: PathLike, max_attr_per_ins: int = 16
) -> Tuple[List[Dict[str, Any]], DetectionMetadata]:
    """Read ``json_file`` (pycocotools) into ``(records, metadata)``; boxes stay ``XYWH`` as in the
    file (the mapper converts them). ``file_name`` is joined to ``image_root``.

    Raises :class:`DetectionDatasetError` for what the training step would otherwise trip over
    later: duplicate annotation ids, ``ignore != 0``, attribute ids that are not integers >= 0
    or more than ``max_attr_per_ins`` of them, malformed boxes.
    """
    from pycocotools.coco import COCO

    source = os.fspath(json_file)
    if not os.path.isfile(source):
        raise DetectionDatasetError("dataset json not found", source)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(source)
    except (ValueError, KeyError, TypeError) as e:
        raise DetectionDatasetError(f"not a COCO detection json ({e})", source) from None

    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise DetectionDatasetError("no categories", source)
    cats = coco.loadCats(cat_ids)
    thing_classes = tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))
    if not (min(cat_ids) == 1 and max(cat_ids) == len(cat_ids)):
        logger.warning("%s: category ids are not 1..%d; mapping them by rank", source, len(cat_ids))
    id_map = {cid: k for k, cid in enumerate(cat_ids)}
    attribute_classes = tuple(
        a["name"] for a in sorted(coco.dataset.get("attributes", []), key=lambda a: a["id"])
    )

    img_ids = sorted(coco.imgs.keys())
    anns_per_image = [coco.imgToAnns[i] for i in img_ids]
    if "minival" not in os.path.basename(source):
        ann_ids = [a["id"] for anns in anns_per_image for a in anns]
        if len(set(ann_ids)) != len(ann_ids):
            raise DetectionDatasetError("annotation ids are not unique", source)

    records: List[Dict[str, Any]] = []
    for img, anns in zip(coco.loadImgs(img_ids), anns_per_image):
        objs = []
        for ann in anns:
            objs.append(_annotation(ann, id_map, max_attr_per_ins, source))
        records.append(
            {
                "file_name": os.path.join(os.fspath(image_root), img["file_name"]),
                "height": int(img["height"]),
                "width": int(img["width"]),
                "image_id": img["id"],
                "annotations": objs,
            }
        )
    logger.info("loaded %d images from %s", len(records), source)
    return records, DetectionMetadata(thing_classes, id_map, attribute_classes)


def _annotation(
    ann: Dict[str, Any], id_map: Dict[int, int], max_attr: int, source: str
) -> Dict[str, Any]:
    where = f"annotation {ann.get('id')}"
    if ann.get("ignore", 0) != 0:
        raise DetectionDatasetError(f'{where}: "ignore" annotations are not supported', source)
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DetectionDatasetError(f"{where}: bbox must be [x, y, w, h]", source)
    if ann.get("category_id") not in id_map:
        raise DetectionDatasetError(
            f"{where}: unknown category_id {ann.get('category_id')}", source
        )
    obj: Dict[str, Any] = {
        "iscrowd": int(ann.get("iscrowd", 0)),
        "bbox": [float(v) for v in bbox],
        "category_id": id_map[ann["category_id"]],
    }
    attrs = ann.get("attribute_ids")
    if attrs:
        if not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in attrs):
            raise DetectionDatasetError(f"{where}: attribute_ids must be integers >= 0", source)
        if len(attrs) > max_attr:
            raise DetectionDatasetError(
                f"{where}: {len(attrs)} attribute_ids, more than INPUT.MAX_ATTR_PER_INS={max_attr}",
                source,
            )
        obj["attribute_ids"] = list(attrs)
    return obj


def filter_images_without_annotations(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Detectron2's ``FILTER_EMPTY_ANNOTATIONS``: keep images with at least one non-crowd object."""
    kept = [r for r in records if any(a.get("iscrowd", 0) == 0 for a in r["annotations"])]
    if len(kept) < len(records):
        logger.info("removed %d images without usable annotations", len(records) - len(kept))
    return kept
