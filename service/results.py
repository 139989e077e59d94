"""Model outputs -> what one request asked for: pooling, top-K attributes, names, output dtype.

This is the only post-processing the service does, and it only selects or summarises the model's
numbers (pooling, top-K, truncation, a dtype cast); the arrays themselves come from the detector
unchanged. Grid maps become rows with the feature store's own :func:`grid_map_to_rows`, so a
service answer and a stored record have the same layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from gridfeats.store.records import grid_map_to_rows
from service.backend import GridOutput, ModelOutput, RegionOutput
from service.errors import InvalidParameter, ModelFailure
from service.schemas import FeatureQuery


class VocabularyError(ValueError):
    """A vocabulary file does not fit the model (wrong length); raised at start-up."""


@dataclass(frozen=True)
class Vocabulary:
    """Optional display names of object classes and attributes, index = model id."""

    objects: Optional[Tuple[str, ...]] = None
    attributes: Optional[Tuple[str, ...]] = None

    @classmethod
    def load(
        cls, objects_path: Optional[str], attributes_path: Optional[str], num_classes: int, num_attributes: int
    ) -> "Vocabulary":
        """Read the VG vocabulary files and check that they have one name per model id."""
        from gridfeats.data.vocab import read_vocab_names

        objects = tuple(read_vocab_names(objects_path)) if objects_path else None
        attributes = tuple(read_vocab_names(attributes_path)) if attributes_path else None
        if objects is not None and len(objects) != num_classes:
            raise VocabularyError(
                f"{objects_path} names {len(objects)} objects but the model has {num_classes} classes"
            )
        if attributes is not None and len(attributes) != num_attributes:
            raise VocabularyError(
                f"{attributes_path} names {len(attributes)} attributes but the model has {num_attributes}"
            )
        return cls(objects, attributes)

    @property
    def loaded(self) -> bool:
        return self.objects is not None or self.attributes is not None


@dataclass
class ImageResult:
    """One image's answer: numeric arrays (JSON and NumPy) and optional names (JSON only)."""

    index: int
    image_hw: Tuple[int, int]
    input_hw: Tuple[int, int]
    arrays: Dict[str, np.ndarray]
    names: Dict[str, List] = field(default_factory=dict)


def pool_grid(feature_map: np.ndarray, op: str, size: int) -> np.ndarray:
    """Adaptive avg/max pooling of a ``[C, h, w]`` map to ``min(size, h) x min(size, w)`` cells.

    Cell ``i`` along an axis of length ``n`` pooled to ``m`` covers ``floor(i*n/m) : ceil((i+1)*n/m)``,
    the same windows as torch's adaptive pooling.
    """
    if op == "none":
        return feature_map
    c, h, w = feature_map.shape
    out_h, out_w = min(size, h), min(size, w)
    reduce = np.mean if op == "avg" else np.max
    out = np.empty((c, out_h, out_w), dtype=feature_map.dtype)
    for i in range(out_h):
        y0, y1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            x0, x1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[:, i, j] = reduce(feature_map[:, y0:y1, x0:x1], axis=(1, 2))
    return out


def top_attributes(attr_scores: Optional[np.ndarray], k: int, num_boxes: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable attribute ids per box and their probabilities (ties: lower id first)."""
    if attr_scores is None or k == 0:
        return np.zeros((num_boxes, 0), np.int32), np.zeros((num_boxes, 0), np.float32)
    k = min(k, attr_scores.shape[1])
    order = np.argsort(-attr_scores, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(attr_scores, order, axis=1).astype(np.float32)


def cast_features(features: np.ndarray, dtype: np.dtype, index: int) -> np.ndarray:
    """``features`` in the requested dtype, refusing NaN/inf (model fault) and float16 overflow."""
    if not np.isfinite(features).all():
        raise ModelFailure(f"image {index}: the model produced NaN or infinite features")
    with np.errstate(over="ignore"):  # overflow is detected below and reported to the client
        cast = features.astype(dtype, copy=False)
    if cast.dtype != features.dtype and not np.isfinite(cast).all():
        raise InvalidParameter(
            f"image {index}: features exceed the {dtype} range (max {np.finfo(dtype).max:g}); "
            "ask for precision=float32"
        )
    return cast


def _grid_result(index: int, output: GridOutput, query: FeatureQuery, dtype: np.dtype) -> ImageResult:
    pooled = pool_grid(output.feature_map, query.pool, query.pool_size)
    rows = cast_features(grid_map_to_rows(pooled), dtype, index)
    arrays = {"features": rows, "grid_hw": np.asarray(pooled.shape[1:], dtype=np.int32)}
    return ImageResult(index, output.image_hw, output.input_hw, arrays)


def _region_result(
    index: int, output: RegionOutput, query: FeatureQuery, dtype: np.dtype, vocab: Vocabulary
) -> ImageResult:
    keep = len(output.scores) if query.max_regions is None else min(query.max_regions, len(output.scores))
    classes = output.classes[:keep].astype(np.int32)
    attr_scores = None if output.attr_scores is None else output.attr_scores[:keep]
    attr_ids, attr_probs = top_attributes(attr_scores, query.attr_topk, keep)
    arrays = {
        "features": cast_features(output.features[:keep], dtype, index),
        "boxes": output.boxes[:keep].astype(np.float32, copy=False),
        "scores": output.scores[:keep].astype(np.float32, copy=False),
        "classes": classes,
        "attr_ids": attr_ids,
        "attr_scores": attr_probs,
    }
    names: Dict[str, List] = {}
    if vocab.objects is not None:
        names["class_names"] = [vocab.objects[c] for c in classes.tolist()]
    if vocab.attributes is not None:
        names["attr_names"] = [[vocab.attributes[a] for a in row] for row in attr_ids.tolist()]
    return ImageResult(index, output.image_hw, output.input_hw, arrays, names)


def shape_results(outputs: Sequence[ModelOutput], query: FeatureQuery, vocab: Vocabulary) -> List[ImageResult]:
    """Turn the model outputs of one request into its per-image answers, in request order."""
    dtype = np.dtype(query.precision)
    results: List[ImageResult] = []
    for index, output in enumerate(outputs):
        if isinstance(output, GridOutput):
            results.append(_grid_result(index, output, query, dtype))
        else:
            results.append(_region_result(index, output, query, dtype, vocab))
    return results
