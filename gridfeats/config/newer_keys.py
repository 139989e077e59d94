"""Keys that Detectron2 added after ffff8ac, which we accept in user configs and then ignore.

Why: users often hand us a config dumped by a recent Detectron2 (``cfg.dump()`` writes every key).
Those files carry keys the reference version never had; rejecting them as unknown would make the
files unusable, while merging them would change ``cfg.dump()`` away from Detectron2@ffff8ac's.
None of them changes inference of the grid-feats models (docs/detectron2-facts.md section 11), so
they are removed before merging and the caller logs their names.

A key listed here that is a node (``SOLVER.AMP``) is dropped with everything under it. The list
covers the keys of Detectron2's defaults from v0.2 up to the newest release read.
"""

from __future__ import annotations

from typing import Any, Dict, List

NEWER_DETECTRON2_KEYS = frozenset(
    {
        "INPUT.RANDOM_FLIP",
        "DATALOADER.REPEAT_SQRT",
        "MODEL.RPN.BBOX_REG_LOSS_TYPE",
        "MODEL.RPN.BBOX_REG_LOSS_WEIGHT",
        "MODEL.RPN.CONV_DIMS",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
        "MODEL.ROI_BOX_HEAD.USE_FED_LOSS",
        "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE",
        "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER",
        "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES",
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
        "MODEL.RETINANET.NORM",
        "SOLVER.BASE_LR_END",
        "SOLVER.NESTEROV",
        "SOLVER.NUM_DECAYS",
        "SOLVER.RESCALE_INTERVAL",
        "SOLVER.REFERENCE_WORLD_SIZE",
        "SOLVER.AMP",
        "FLOAT32_PRECISION",
    }
)


def is_newer_detectron2_key(full_key: str) -> bool:
    """True for a listed key or anything under a listed node (``SOLVER.AMP.ENABLED``)."""
    parts = full_key.split(".")
    return any(".".join(parts[: i + 1]) in NEWER_DETECTRON2_KEYS for i in range(len(parts)))


def drop_newer_detectron2_keys(raw: Dict[str, Any]) -> List[str]:
    """Remove newer-Detectron2 keys from a raw (YAML-loaded) nested dict, in place.

    Returns the dotted names that were removed, sorted, so the caller can warn about them.
    """
    dropped: List[str] = []

    def walk(node: Dict[str, Any], prefix: str) -> None:
        for key in list(node):
            full_key = f"{prefix}{key}"
            if full_key in NEWER_DETECTRON2_KEYS:
                del node[key]
                dropped.append(full_key)
            elif isinstance(node[key], dict):
                walk(node[key], f"{full_key}.")

    walk(raw, "")
    return sorted(dropped)
