"""Shared helpers of the ``gridfeats extract`` tests (no tests here).

Everything runs the real R-50 grid detector from its seeded random initialisation on small inputs
(shortest edge 64, few proposals) so a model run costs a fraction of a second per image.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Sequence

import numpy as np
import torch

from gridfeats.store import FeatureStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Small inputs, few proposals, 40 classes and 50 attributes instead of VG's 1600 and 400: the same
#: code paths as the released models at 600x1000, at a fraction of the cost.
SMALL = [
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "40",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "40",
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES",
    "50",
]
#: With random weights no class reaches Detectron2's 0.05 threshold; keep a few boxes anyway.
D2_RANDOM = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "8"]


def make_images(out_dir: str, num: int) -> str:
    """Write ``num`` synthetic images (varied sizes, JPEG and PNG); returns their folder."""
    from gridfeats.data.synthetic import make_synthetic

    paths = make_synthetic(out_dir, num, seed=0)
    return str(paths["images"])


def read_all(path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """A store's images as ``{id: {field: array}}``, plus errors under the key ``"errors/"``."""
    store = FeatureStore(path)
    items = {image_id: store[image_id] for image_id in store}
    items["errors/"] = dict(store.errors)
    store.close()
    return items


def assert_same_content(a: Dict, b: Dict) -> None:
    """Same ids, same errors, bit-identical rows and index values (order of images may differ)."""
    assert sorted(a) == sorted(b)
    assert a["errors/"] == b["errors/"]
    for image_id, fields in a.items():
        if image_id == "errors/":
            continue
        other = b[image_id]
        assert sorted(fields) == sorted(other), image_id
        for name, value in fields.items():
            assert value.dtype == other[name].dtype and value.shape == other[name].shape, (
                image_id,
                name,
            )
            assert np.array_equal(value, other[name]), (image_id, name)


def cli_command(args: Sequence[str]) -> list:
    """``python -m gridfeats extract ...`` with our thread count (the results depend on it)."""
    return [
        sys.executable,
        "-m",
        "gridfeats",
        "extract",
        "--threads",
        str(torch.get_num_threads()),
        *args,
    ]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("GRIDFEATS_STORE_CRASH_AT", None)
    return env
