"""Request options -> feature spec, and feature-store records -> the answer of one request.

The numbers come unchanged from the extraction's feature makers (see :mod:`service.backend`); this
module only casts the features to the requested dtype (refusing casts that would corrupt them, with
the store's own :func:`~gridfeats.features.storage_problem` check) and adds display
names from the optional vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from gridfeats.errors import GridfeatsError
from gridfeats.features import BottomUpSettings, FeatureSpec, storage_problem
from gridfeats.store.records import Record
from service.errors import InvalidParameter, ModelFailure
from service.schemas import FeatureQuery

#: Record fields that describe the image rather than its rows.
_SIZE_FIELDS = ("image_hw", "input_hw")


class VocabularyError(GridfeatsError, ValueError):
    """A vocabulary file does not fit the model (wrong length); raised at start-up."""


@dataclass(frozen=True)
class Vocabulary:
    """Optional display names of object classes and attributes, index = model id."""

    objects: Optional[Tuple[str, ...]] = None
    attributes: Optional[Tuple[str, ...]] = None

    @classmethod
    def load(
        cls,
        objects_path: Optional[str],
        attributes_path: Optional[str],
        num_classes: int,
        num_attributes: int,
    ) -> "Vocabulary":
        """Read the VG vocabulary files and check that they have one name per model id."""
        from gridfeats.data.vocab import read_vocab_names

        objects = tuple(read_vocab_names(objects_path)) if objects_path else None
        attributes = tuple(read_vocab_names(attributes_path)) if attributes_path else None
        if objects is not None and len(objects) != num_classes:
            raise VocabularyError(
                f"{objects_path} names {len(objects)} objects "
                f"but the model has {num_classes} classes"
            )
        if attributes is not None and len(attributes) != num_attributes:
            raise VocabularyError(
                f"{attributes_path} names {len(attributes)} attributes "
                f"but the model has {num_attributes}"
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


def feature_spec(query: FeatureQuery) -> FeatureSpec:
    """The model-side part of a request's options (what the backend groups batches by)."""
    if query.mode == "grid":
        return FeatureSpec(mode="grid", grid_pool=query.pool_hw())
    regions = (
        "detectron2"
        if query.regions == "detectron2"
        else BottomUpSettings(
            score_thresh=query.bottom_up_thresh,
            min_boxes=query.min_boxes,
            max_boxes=query.max_boxes,
        )
    )
    return FeatureSpec(mode="region", regions=regions, attr_topk=query.attr_topk)


def cast_features(features: np.ndarray, dtype: str, index: int) -> np.ndarray:
    """``features`` as ``dtype``; NaN/inf from the model is a 500, a float16 overflow a 422."""
    problem = storage_problem({"features": features}, dtype)
    if problem is not None:
        if not np.isfinite(features).all():
            raise ModelFailure(f"image {index}: {problem}")
        peak = float(np.abs(features).max())
        raise InvalidParameter(
            f"image {index}: features exceed the {dtype} range (max |value| {peak:.4g}); "
            "ask for precision=float32"
        )
    return features.astype(dtype, copy=False)


def _image_result(index: int, record: Record, dtype: str, vocab: Vocabulary) -> ImageResult:
    arrays = {name: value for name, value in record.items() if name not in _SIZE_FIELDS}
    arrays["features"] = cast_features(arrays["features"], dtype, index)
    names: Dict[str, List] = {}
    if "classes" in arrays:
        if vocab.objects is not None:
            names["class_names"] = [vocab.objects[c] for c in arrays["classes"].tolist()]
        if vocab.attributes is not None:
            names["attr_names"] = [
                [vocab.attributes[a] for a in row] for row in arrays["attr_ids"].tolist()
            ]
    hw = tuple(int(v) for v in record["image_hw"])
    input_hw = tuple(int(v) for v in record["input_hw"])
    return ImageResult(index, hw, input_hw, arrays, names)  # type: ignore[arg-type]


def shape_results(
    records: Sequence[Record], query: FeatureQuery, vocab: Vocabulary
) -> List[ImageResult]:
    """The per-image answers of one request, in request order."""
    return [
        _image_result(index, record, query.precision, vocab) for index, record in enumerate(records)
    ]
