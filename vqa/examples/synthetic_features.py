"""Feature stores encoding what the synthetic images hold, for training heads without a detector.

Why: the heads' learning can only be shown on features that carry the scene's content, and a
randomly initialised detector's C5 map does not. These stores are written from the synthetic set's
own annotations (``instances.json``) plus the image's pixels, through the project's one writer
(``gridfeats.store.FeatureWriter``) and one image reader, so the heads read them exactly like
extracted features:

* every object contributes one-hot shape, colour and size channels;
* grid mode: a ``ceil(H/stride) x ceil(W/stride)`` map; each cell holds the objects' channels
  weighted by the fraction of the cell their box covers, plus the cell's mean RGB (which carries
  the background tone);
* region mode: one row per object (box = its annotated box, score 1) plus the object's mean RGB;
* the structured vector goes through a fixed random linear map to ``feature_dim`` dense channels
  and gets Gaussian noise, so nothing is readable off a single channel.

Use real extracted features (``gridfeats extract``) whenever a trained detector is available.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np

from gridfeats.data.image_io import read_image
from gridfeats.store import FeatureWriter, StoreMetadata, grid_record, region_record
from gridfeats.store.layout import MODES

PathLike = Union[str, Path]


def _vocabulary(instances: Dict[str, Any]) -> Dict[str, int]:
    return {"categories": len(instances["categories"]), "attributes": len(instances["attributes"])}


def _object_vector(annotation: Dict[str, Any], sizes: Dict[str, int]) -> np.ndarray:
    vec = np.zeros(sizes["categories"] + sizes["attributes"], dtype=np.float32)
    vec[int(annotation["category_id"]) - 1] = 1.0
    for attribute in annotation.get("attribute_ids", []):
        vec[sizes["categories"] + int(attribute)] = 1.0
    return vec


def _cell_coverage(box_xywh: Sequence[float], cell: Sequence[float]) -> float:
    x, y, w, h = box_xywh
    x0, y0, x1, y1 = cell
    ix = max(0.0, min(x + w, x1) - max(x, x0))
    iy = max(0.0, min(y + h, y1) - max(y, y0))
    return ix * iy / max((x1 - x0) * (y1 - y0), 1e-6)


def _grid_map(
    image: np.ndarray, objects: List[Dict[str, Any]], sizes: Dict[str, int], stride: int
) -> np.ndarray:
    """``[C, gh, gw]`` structured map (object channels then mean RGB)."""
    height, width = image.shape[:2]
    gh, gw = math.ceil(height / stride), math.ceil(width / stride)
    channels = sizes["categories"] + sizes["attributes"] + 3
    fmap = np.zeros((channels, gh, gw), dtype=np.float32)
    vectors = [(_object_vector(o, sizes), o["bbox"]) for o in objects]
    for gy in range(gh):
        for gx in range(gw):
            cell = (
                gx * stride,
                gy * stride,
                min((gx + 1) * stride, width),
                min((gy + 1) * stride, height),
            )
            for vec, box in vectors:
                fmap[:-3, gy, gx] += _cell_coverage(box, cell) * vec
            pixels = image[cell[1] : cell[3], cell[0] : cell[2]].reshape(-1, 3)
            fmap[-3:, gy, gx] = pixels.mean(axis=0) / 255.0
    return fmap


def _region_rows(
    image: np.ndarray, objects: List[Dict[str, Any]], sizes: Dict[str, int]
) -> np.ndarray:
    rows = []
    for o in objects:
        x, y, w, h = (int(round(v)) for v in o["bbox"])
        pixels = image[y : y + max(h, 1), x : x + max(w, 1)].reshape(-1, 3)
        rows.append(np.concatenate([_object_vector(o, sizes), pixels.mean(axis=0) / 255.0]))
    channels = sizes["categories"] + sizes["attributes"] + 3
    return np.asarray(rows, dtype=np.float32).reshape(-1, channels)


def write_structured_store(
    synthetic_dir: PathLike,
    out_path: PathLike,
    mode: str = "grid",
    feature_dim: int = 64,
    stride: int = 32,
    noise: float = 0.05,
    seed: int = 0,
) -> Path:
    """Writes a ``mode`` store for every image of ``synthetic_dir/annotations/instances.json``.

    Store image ids are the decimal image ids, as the VQA/caption files use them.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    root = Path(synthetic_dir)
    instances_path = root / "annotations" / "instances.json"
    if not instances_path.is_file():
        raise FileNotFoundError(f"not a synthetic data set (no {instances_path})")
    instances = json.loads(instances_path.read_text(encoding="utf-8"))
    sizes = _vocabulary(instances)
    by_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for annotation in instances["annotations"]:
        by_image[int(annotation["image_id"])].append(annotation)
    rng = np.random.default_rng(seed)
    structured_dim = sizes["categories"] + sizes["attributes"] + 3
    projection = rng.normal(
        0.0, 1.0 / math.sqrt(structured_dim), size=(structured_dim, feature_dim)
    ).astype(np.float32)
    meta = StoreMetadata(
        mode=mode,
        feature_dim=feature_dim,
        dtype="float32",
        attr_topk=1 if mode == "region" else 0,
        config=f"structured synthetic features (stride {stride}, seed {seed})",
    )
    out_path = Path(out_path)
    with FeatureWriter(str(out_path), meta, compression="none", overwrite=True) as writer:
        for image in instances["images"]:
            pixels = read_image(root / "images" / image["file_name"])
            objects = by_image.get(int(image["id"]), [])
            hw = pixels.shape[:2]
            if mode == "grid":
                fmap = _grid_map(pixels, objects, sizes, stride)
                dense = np.einsum("chw,cd->dhw", fmap, projection)
                dense += rng.normal(0.0, noise, size=dense.shape).astype(np.float32)
                writer.add(str(image["id"]), grid_record(dense, hw, hw))
            else:
                rows = _region_rows(pixels, objects, sizes) @ projection
                rows += rng.normal(0.0, noise, size=rows.shape).astype(np.float32)
                boxes = np.asarray(
                    [[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in objects)],
                    dtype=np.float32,
                ).reshape(-1, 4)
                count = len(objects)
                writer.add(
                    str(image["id"]),
                    region_record(
                        rows,
                        boxes,
                        np.ones(count, np.float32),
                        np.asarray([int(o["category_id"]) - 1 for o in objects], np.int32),
                        np.zeros((count, 1), np.int32),
                        np.ones((count, 1), np.float32),
                        hw,
                        hw,
                    ),
                )
    return out_path


def make_feature_dataset(
    out_dir: PathLike,
    num_images: int,
    seed: int = 0,
    modes: Sequence[str] = MODES,
    feature_dim: int = 64,
    overwrite: bool = False,
) -> Dict[str, Path]:
    """A synthetic data set plus one structured store per mode, e.g. for tests and the demo.

    Returns ``gridfeats.data.synthetic.output_paths`` extended with ``"<mode>_features"``.
    ``overwrite`` replaces a synthetic set already in ``out_dir`` (else that is an error).
    """
    from gridfeats.data.synthetic import make_synthetic

    paths = dict(
        make_synthetic(Path(out_dir) / "synthetic", num_images, seed=seed, overwrite=overwrite)
    )
    for mode in modes:
        paths[f"{mode}_features"] = write_structured_store(
            paths["root"],
            Path(out_dir) / f"{mode}_features.h5",
            mode,
            feature_dim=feature_dim,
            seed=seed,
        )
    return paths
