"""Image feature rows for the heads, read from a ``gridfeats`` feature store.

Every image becomes ``ImageRows``: ``features [n, D]`` float32, ``boxes [n, 4]`` normalised
``(x1, y1, x2, y2)`` in ``[0, 1]`` and the grid size. Row positions follow the convention of
``vqa.models.inputs`` (one convention for all models):

* grid store: row ``y * w + x`` of an ``h x w`` map is the cell ``(x/w, y/h, (x+1)/w, (y+1)/h)``,
  i.e. its normalised (y, x) position and the grid size; ``grid_hw = (h, w)``;
* region store: the detected box divided by the original image width/height, clipped to
  ``[0, 1]``; ``grid_hw = (0, 0)``.

At most ``max_rows`` rows are kept (MCAN uses 100 regions; a 600x1000 grid is 19x32 = 608):
regions keep the ``max_rows`` highest-scoring boxes; a larger grid is average-pooled to the
largest grid of the same aspect ratio that fits, so the whole image stays visible rather than
being cropped.

Reading is cached: a question-answering set asks about each image several times per epoch, and
every epoch again, while a store read decompresses whole HDF5 chunks (about 10 ms an image for a
gzip grid store, measured: 65 % of a small Pythia epoch). ``cache_bytes`` bounds the decoded rows
kept in memory (per process: each DataLoader worker holds its own); images past the bound are
read from the store every time.

``data.feature_norm: standardize`` shifts and scales every feature channel by its mean and standard
deviation over the training images' rows (:func:`fit_row_normalization`; kept in the checkpoint,
so prediction uses the training statistics). Why: a detector's grid cells share a large common
component (on the demo detector each channel's mean is about its standard deviation), so at
initialisation the heads' top-down attention sees nearly equal cells and stays uniform for many
epochs; standardised, object cells stand out from the start (heads_demo: Pythia on demo-detector
grids escaped that plateau, see the README). ``none`` (the default) feeds the stored values as the
papers do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from vqa.models.inputs import grid_cell_boxes

StoreLike = Union[str, "os.PathLike[str]", Any]  # a path or a gridfeats.store.FeatureStore


@dataclass
class ImageRows:
    """One image's rows: ``features [n, D]``, ``boxes [n, 4]`` (normalised), ``grid_hw``."""

    features: torch.Tensor
    boxes: torch.Tensor
    grid_hw: Tuple[int, int]


def fitted_grid_size(h: int, w: int, max_rows: int) -> Tuple[int, int]:
    """Largest ``(h', w')`` with ``h' <= h``, ``w' <= w``, ``h' * w' <= max_rows``, aspect kept."""
    if h * w <= max_rows:
        return h, w
    scale = math.sqrt(max_rows / (h * w))
    new_h, new_w = max(1, min(h, int(h * scale))), max(1, min(w, int(w * scale)))
    while new_h * new_w > max_rows:  # guards rounding at the edges (e.g. a 1-pixel-wide side)
        if new_h >= new_w:
            new_h -= 1
        else:
            new_w -= 1
    return new_h, new_w


FEATURE_NORMS = ("none", "standardize")


@dataclass
class RowNormalization:
    """Per-channel ``(x - mean) / std`` applied to every row a reader returns."""

    mean: torch.Tensor
    std: torch.Tensor

    def state(self) -> Dict[str, List[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Sequence[float]]) -> "RowNormalization":
        return cls(
            torch.tensor(state["mean"], dtype=torch.float32),
            torch.tensor(state["std"], dtype=torch.float32),
        )


class ImageRowReader:
    """Reads ``ImageRows`` by image id from a feature store (a path or a ``FeatureStore``).

    Given a path, the store is opened here; ``gridfeats.store.FeatureStore`` opens its HDF5
    handle lazily per process, so the reader can be used inside DataLoader workers.
    ``cache_bytes``: memory for decoded images kept for later reads (0: none; see the module
    docstring). Cached rows are shared with the caller: treat them as read-only.
    """

    def __init__(
        self, store: StoreLike, max_rows: Optional[int] = None, cache_bytes: int = 0
    ) -> None:
        if isinstance(store, (str, os.PathLike)):
            from gridfeats.store import FeatureStore

            if not os.path.isfile(store) and not os.path.isdir(os.fspath(store) + ".parts"):
                raise FileNotFoundError(f"feature store not found: {os.fspath(store)}")
            store = FeatureStore(os.fspath(store))
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.store = store
        self.max_rows = max_rows
        self.mode: str = store.mode
        self.feature_dim: int = int(store.feature_dim)
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.cache_bytes = int(cache_bytes)
        self._cache: Dict[str, ImageRows] = {}
        self._cached_bytes = 0
        self.normalization: Optional[RowNormalization] = None

    def set_normalization(self, normalization: Optional[RowNormalization]) -> None:
        """Apply ``normalization`` to every row read from now on (``None``: stored values)."""
        if normalization is not None and normalization.mean.shape != (self.feature_dim,):
            raise ValueError(
                f"normalization statistics have {tuple(normalization.mean.shape)} channels but "
                f"the store has {self.feature_dim}-d features"
            )
        self.normalization = normalization
        self._cache.clear()
        self._cached_bytes = 0

    def __contains__(self, image_id: Any) -> bool:
        return image_id in self.store

    def read(self, image_id: Any) -> ImageRows:
        key = str(image_id)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        item = self.store[image_id]
        features = torch.from_numpy(np.asarray(item["features"], dtype=np.float32))
        if self.mode == "grid":
            rows = self._grid_rows(features, item["grid_hw"])
        else:
            rows = self._region_rows(features, item)
        if self.normalization is not None:
            norm = self.normalization
            rows = ImageRows((rows.features - norm.mean) / norm.std, rows.boxes, rows.grid_hw)
        size = rows.features.nbytes + rows.boxes.nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = rows
            self._cached_bytes += size
        return rows

    def _grid_rows(self, features: torch.Tensor, grid_hw: Any) -> ImageRows:
        h, w = int(grid_hw[0]), int(grid_hw[1])
        if self.max_rows is not None and h * w > self.max_rows:
            new_h, new_w = fitted_grid_size(h, w, self.max_rows)
            fmap = features.t().reshape(1, -1, h, w)
            features = F.adaptive_avg_pool2d(fmap, (new_h, new_w))[0].reshape(-1, new_h * new_w).t()
            h, w = new_h, new_w
        return ImageRows(features.contiguous(), grid_cell_boxes(h, w), (h, w))

    def _region_rows(self, features: torch.Tensor, item: Any) -> ImageRows:
        boxes = torch.from_numpy(np.asarray(item["boxes"], dtype=np.float32)).reshape(-1, 4)
        if self.max_rows is not None and features.shape[0] > self.max_rows:
            scores = torch.from_numpy(np.asarray(item["scores"], dtype=np.float32))
            keep = torch.argsort(scores, descending=True, stable=True)[: self.max_rows]
            keep = torch.sort(keep).values  # keep the stored order among the survivors
            features, boxes = features[keep], boxes[keep]
        image_h, image_w = (max(int(v), 1) for v in item["image_hw"])
        scale = torch.tensor([image_w, image_h, image_w, image_h], dtype=torch.float32)
        return ImageRows(features.contiguous(), (boxes / scale).clamp(0.0, 1.0), (0, 0))


def open_row_reader(data_cfg: Any, features: Optional[str] = None) -> Tuple[str, "ImageRowReader"]:
    """A task's feature store (``features`` overrides ``data.features``) and its row reader."""
    from vqa.data.json_files import DataFormatError

    path = features or data_cfg["features"]
    if not path:
        raise DataFormatError("no feature store given (data.features or --features)")
    cache_mb = int(data_cfg.get("row_cache_mb", 0) or 0)  # absent in configs saved before it
    return path, ImageRowReader(path, max_rows=data_cfg["max_rows"], cache_bytes=cache_mb << 20)


def fit_row_normalization(
    reader: ImageRowReader, image_ids: Iterable[Any], max_images: int = 1000
) -> RowNormalization:
    """Mean and standard deviation per channel of the rows ``reader`` returns (after grid pooling
    or top-k) for up to ``max_images`` of ``image_ids`` (evenly spaced over the distinct ids, so
    the statistics do not depend on file order alone). A channel whose deviation is below 1% of
    the mean deviation (e.g. always zero after a ReLU) is scaled by that floor instead, so that
    it is not blown up from noise."""
    if reader.normalization is not None:
        raise ValueError("fit the statistics on a reader without normalization")
    distinct = [i for i in dict.fromkeys(image_ids) if i in reader]
    if not distinct:
        raise ValueError("no training image of the feature store to fit the normalization on")
    step = max(1, len(distinct) // max_images)
    total = torch.zeros(reader.feature_dim, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for image_id in distinct[::step][:max_images]:
        rows = reader.read(image_id).features.double()
        total += rows.sum(0)
        total_sq += (rows * rows).sum(0)
        count += rows.shape[0]
    if count == 0:
        raise ValueError("the training images have no feature rows to fit the normalization on")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    std = std.clamp_min(max(0.01 * float(std.mean()), 1e-12))
    return RowNormalization(mean.float(), std.float())


def task_row_normalization(
    data_cfg: Mapping[str, Any],
    reader: ImageRowReader,
    state: Optional[Mapping[str, Any]],
    train_image_ids: Callable[[], Iterable[Any]],
) -> Optional[RowNormalization]:
    """A task's row normalization, installed on ``reader``: a checkpoint's own (``state``), else
    fitted on ``train_image_ids()`` when ``data.feature_norm`` is ``standardize``."""
    if state is not None:
        saved = state.get("feature_norm")  # absent in checkpoints written before the option
        norm = RowNormalization.from_state(saved) if saved else None
    else:
        how = data_cfg.get("feature_norm") or "none"
        if how not in FEATURE_NORMS:
            raise ValueError(f"data.feature_norm must be one of {FEATURE_NORMS}, got {how!r}")
        norm = fit_row_normalization(reader, train_image_ids()) if how == "standardize" else None
    reader.set_normalization(norm)
    return norm


def as_row_reader(
    features: Union["ImageRowReader", StoreLike], max_rows: Optional[int] = None
) -> "ImageRowReader":
    """``features`` as an ``ImageRowReader``: a reader is used as is, a store/path is wrapped."""
    if isinstance(features, ImageRowReader):
        if max_rows is not None and max_rows != features.max_rows:
            raise ValueError("pass max_rows to the ImageRowReader itself when giving a reader")
        return features
    return ImageRowReader(features, max_rows=max_rows)


MISSING_IMAGE_POLICIES = ("error", "skip")


def find_missing_images(reader: ImageRowReader, image_ids: Any, policy: str, what: str) -> set:
    """Image ids (of ``image_ids``) absent from the store; raises under ``policy="error"``.

    The message names the store, a few ids and, when the store recorded why an image failed
    extraction, that reason, so "missing" is never a mystery.
    """
    if policy not in MISSING_IMAGE_POLICIES:
        raise ValueError(f"missing_images must be one of {MISSING_IMAGE_POLICIES}, got {policy!r}")
    missing = {image_id for image_id in dict.fromkeys(image_ids) if image_id not in reader}
    if missing and policy == "error":
        from vqa.data.json_files import DataFormatError

        shown = sorted(missing, key=str)[:5]
        failed = dict(getattr(reader.store, "errors", []) or [])
        reasons = [f"{i!r}: {failed[str(i)]}" for i in shown if str(i) in failed]
        detail = f"; extraction failed for {', '.join(reasons)}" if reasons else ""
        raise DataFormatError(
            f"{len(missing)} image(s) of the {what} are not in the feature store "
            f"{getattr(reader.store, 'path', '')} (e.g. {', '.join(map(repr, shown))}){detail}. "
            f"Extract them, or pass missing_images='skip' to leave their entries out"
        )
    return missing
