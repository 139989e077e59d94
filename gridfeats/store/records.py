"""One image's entry in the store: building, checking and converting it.

A *record* is a plain dict of numpy arrays (torch CPU tensors are accepted and converted). The
writer checks every record against the run metadata before it is buffered, so a shape or dtype bug
in the caller fails at ``add`` with the field name in the message instead of producing a store that
readers misinterpret later.

Grid maps are stored as rows: row ``y*w + x`` holds ``map[:, y, x]``. :func:`grid_map_to_rows`
and :func:`grid_rows_to_map` are the only two places that know this.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np

from gridfeats.store.layout import StoreMetadata, hw_fields, row_specs

Record = Dict[str, np.ndarray]


def grid_map_to_rows(feature_map: Any) -> np.ndarray:
    """``[D,h,w]`` (or ``[1,D,h,w]``) map -> ``[h*w, D]`` rows in row-major (y, x) order."""
    fmap = _to_numpy(feature_map)
    if fmap.ndim == 4 and fmap.shape[0] == 1:
        fmap = fmap[0]
    if fmap.ndim != 3:
        raise ValueError(f"grid feature map must have shape [D,h,w], got {list(fmap.shape)}")
    d, h, w = fmap.shape
    return np.ascontiguousarray(fmap.reshape(d, h * w).T)


def grid_rows_to_map(rows: np.ndarray, grid_hw: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`grid_map_to_rows`: ``[h*w, D]`` rows -> ``[D,h,w]`` map."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if rows.ndim != 2 or rows.shape[0] != h * w:
        raise ValueError(f"{rows.shape[0]} rows do not form a {h}x{w} grid")
    return np.ascontiguousarray(rows.T.reshape(rows.shape[1], h, w))


def grid_record(feature_map: Any, image_hw: Sequence[int], input_hw: Sequence[int]) -> Record:
    """The record of one grid image from its ``[D,h,w]`` C5 map and its two sizes."""
    fmap = _to_numpy(feature_map)  # once: a GPU tensor is copied to the host a single time
    return {
        "features": grid_map_to_rows(fmap),
        "grid_hw": np.asarray(fmap.shape[-2:], dtype=np.int32),
        "image_hw": np.asarray(image_hw, dtype=np.int32),
        "input_hw": np.asarray(input_hw, dtype=np.int32),
    }


def region_record(
    features: Any,
    boxes: Any,
    scores: Any,
    classes: Any,
    attr_ids: Any,
    attr_scores: Any,
    image_hw: Sequence[int],
    input_hw: Sequence[int],
) -> Record:
    """The record of one region image (K boxes); arrays are converted to the stored dtypes."""
    return {
        "features": _to_numpy(features),
        "boxes": _to_numpy(boxes),
        "scores": _to_numpy(scores),
        "classes": _to_numpy(classes),
        "attr_ids": _to_numpy(attr_ids),
        "attr_scores": _to_numpy(attr_scores),
        "image_hw": np.asarray(image_hw, dtype=np.int32),
        "input_hw": np.asarray(input_hw, dtype=np.int32),
    }


def normalize_record(image_id: str, record: Mapping[str, Any], meta: StoreMetadata) -> Record:
    """Check a record against the run metadata and return owned arrays in the stored dtypes.

    Raises ``ValueError`` naming the image and the field when something does not fit; float16
    storage that would overflow to inf is refused too, since it would silently destroy features.
    """
    specs = row_specs(meta)
    expected = set(specs) | set(hw_fields(meta.mode))
    missing = sorted(expected - set(record))
    if missing:
        raise ValueError(
            f"record for {image_id!r} lacks {missing} (mode {meta.mode!r} needs {sorted(expected)})"
        )
    extra = sorted(set(record) - expected)
    if extra:
        raise ValueError(
            f"record for {image_id!r} has unknown fields {extra} for mode {meta.mode!r}"
        )

    out: Record = {}
    for name in hw_fields(meta.mode):
        value = _to_numpy(record[name]).astype(np.int64, copy=False).reshape(-1)
        if value.shape != (2,) or value.min() < 0:
            raise ValueError(
                f"record for {image_id!r}: {name} must be two non-negative ints, "
                f"got {value.tolist()}"
            )
        out[name] = value.astype(np.int32)

    count = None
    for name, (dtype, trailing) in specs.items():
        value = _to_numpy(record[name])
        if count is None:
            count = value.shape[0] if value.ndim else -1
        if value.shape != (count, *trailing):
            raise ValueError(
                f"record for {image_id!r}: {name} has shape {list(value.shape)}, "
                f"expected {[count, *trailing]}"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
            converted = np.array(value, dtype=dtype, copy=True, order="C")
        if dtype.kind == "f" and not np.isfinite(converted).all():
            if np.isfinite(value).all():
                raise ValueError(
                    f"record for {image_id!r}: {name} overflows {dtype} storage "
                    f"(max {np.finfo(dtype).max})"
                )
            raise ValueError(f"record for {image_id!r}: {name} contains NaN or inf")
        out[name] = converted

    if meta.mode == "grid":
        h, w = out["grid_hw"]
        if int(h) * int(w) != count:
            raise ValueError(
                f"record for {image_id!r}: grid_hw {h}x{w} does not match {count} feature rows"
            )
    return out


def record_nbytes(record: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in record.values()))


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: avoid importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)
