"""The HDF5 layout of `docs/feature-store.md` (version 1), in one place.

Everything that names a dataset, an attribute or a dtype of the store lives here, so that the
writer, the reader, the merge step and the exporters cannot drift apart. It also holds
:class:`StoreMetadata`, the run description that decides whether two files may be resumed into or
merged with each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import h5py
import numpy as np

from gridfeats.store.errors import StoreFormatError

FORMAT_NAME = "gridfeats.features"
FORMAT_VERSION = 1
#: What the numbers in ``rows/`` mean, beyond the file layout. 2: region features of the detectron2
#: rule are pooled at each returned detection's own box in network-input pixels, one row per
#: returned detection. 1 (files without the attribute, gridfeats <= 0.1.0): they were pooled at the
#: original-pixel boxes read on the network-input map (a misalignment copied from a faulty
#: reference), and could hold rows for boxes the empty-box filter drops.
FEATURE_LAYOUT = 2
MODES = ("grid", "region")
STORAGE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("gzip", "lzf", "none")

# Row datasets per mode, in the order they are written.
GRID_ROW_FIELDS: Tuple[str, ...] = ("features",)
REGION_ROW_FIELDS: Tuple[str, ...] = (
    "features",
    "boxes",
    "scores",
    "classes",
    "attr_ids",
    "attr_scores",
)
# Per-image [N,2] int32 index datasets per mode (besides image_id, offset and count).
GRID_HW_FIELDS: Tuple[str, ...] = ("image_hw", "input_hw", "grid_hw")
REGION_HW_FIELDS: Tuple[str, ...] = ("image_hw", "input_hw")

# The metadata fields that must agree before a run may be resumed or shards merged.
COMPATIBILITY_FIELDS: Tuple[str, ...] = (
    "mode",
    "feature_dim",
    "attr_topk",
    "dtype",
    "weights_sha256",
    "config",
    "feature_layout",
)

STRING_DTYPE = h5py.string_dtype("utf-8")


def _default_created_with() -> str:
    from gridfeats.version import __version__

    return f"gridfeats {__version__}"


@dataclass(frozen=True)
class StoreMetadata:
    """What a feature file was made from; stored as root attributes of every store file.

    ``dtype`` is the storage dtype of ``rows/features`` and ``attr_topk`` the K of
    ``rows/attr_ids``/``rows/attr_scores`` (0 in grid mode, where those datasets do not exist).
    """

    mode: str
    feature_dim: int
    config: str = ""
    weights_sha256: str = ""
    dtype: str = "float32"
    attr_topk: int = 0
    created_with: str = dataclasses.field(default_factory=_default_created_with)
    feature_layout: int = FEATURE_LAYOUT

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (
            isinstance(self.feature_dim, bool)
            or int(self.feature_dim) != self.feature_dim
            or self.feature_dim < 1
        ):
            raise ValueError(f"feature_dim must be a positive integer, got {self.feature_dim!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if int(self.feature_layout) != self.feature_layout or self.feature_layout < 1:
            raise ValueError(
                f"feature_layout must be a positive integer, got {self.feature_layout!r}"
            )
        object.__setattr__(self, "feature_layout", int(self.feature_layout))
        if int(self.attr_topk) != self.attr_topk or self.attr_topk < 0:
            raise ValueError(f"attr_topk must be a non-negative integer, got {self.attr_topk!r}")
        if self.mode == "grid" and self.attr_topk != 0:
            raise ValueError("attr_topk must be 0 in grid mode (grid stores have no attributes)")
        for name in ("config", "weights_sha256", "created_with"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(
                    f"{name} must be a string, got {type(getattr(self, name)).__name__}"
                )
        object.__setattr__(self, "feature_dim", int(self.feature_dim))
        object.__setattr__(self, "attr_topk", int(self.attr_topk))

    # --- comparison -------------------------------------------------------------------------
    def mismatches(self, other: "StoreMetadata") -> List[str]:
        """Human-readable differences in the fields that make two files incompatible."""
        problems = []
        for name in COMPATIBILITY_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine == theirs:
                continue
            if name == "feature_layout":
                if self.mode == "region":
                    problems.append(
                        f"feature_layout: the existing store was written by an earlier gridfeats "
                        f"(layout {theirs}, now {mine}) whose detectron2-rule region features "
                        "were pooled at misaligned boxes; start over with --overwrite"
                    )
                continue  # grid rows did not change between layouts
            if name == "config":
                problems.append("config: the effective config YAML differs")
            else:
                problems.append(f"{name}: {theirs!r} (existing) != {mine!r} (requested)")
        return problems

    # --- serialisation ----------------------------------------------------------------------
    def to_attrs(self) -> Dict[str, object]:
        """Root attributes as the layout document names them."""
        return {
            "format": FORMAT_NAME,
            "version": np.int64(FORMAT_VERSION),
            "mode": self.mode,
            "feature_dim": np.int64(self.feature_dim),
            "config": self.config,
            "weights_sha256": self.weights_sha256,
            "created_with": self.created_with,
            "attr_topk": np.int64(self.attr_topk),
            "feature_layout": np.int64(self.feature_layout),
        }

    @classmethod
    def from_file(cls, f: h5py.File) -> "StoreMetadata":
        """Read and check the root attributes of an open store file."""
        attrs = f.attrs
        fmt = _as_str(attrs.get("format"))
        if fmt != FORMAT_NAME:
            raise StoreFormatError(
                f"{f.filename}: not a gridfeats feature store (root attribute 'format' is {fmt!r}, "
                f"expected {FORMAT_NAME!r})"
            )
        version = int(attrs.get("version", -1))
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{f.filename}: store layout version {version} is not supported (this gridfeats "
                f"reads version {FORMAT_VERSION})"
            )
        if "rows/features" not in f:
            raise StoreFormatError(f"{f.filename}: store has no rows/features dataset")
        try:
            return cls(
                mode=_as_str(attrs["mode"]),
                feature_dim=int(attrs["feature_dim"]),
                config=_as_str(attrs.get("config", "")),
                weights_sha256=_as_str(attrs.get("weights_sha256", "")),
                dtype=str(f["rows/features"].dtype),
                attr_topk=int(attrs.get("attr_topk", 0)),
                created_with=_as_str(attrs.get("created_with", "")),
                feature_layout=int(attrs.get("feature_layout", 1)),
            )
        except (KeyError, ValueError) as exc:
            raise StoreFormatError(f"{f.filename}: bad store metadata: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StoreMetadata":
        return cls(**json.loads(text))


def _as_str(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return "" if value is None else str(value)


def row_fields(mode: str) -> Tuple[str, ...]:
    return GRID_ROW_FIELDS if mode == "grid" else REGION_ROW_FIELDS


def hw_fields(mode: str) -> Tuple[str, ...]:
    return GRID_HW_FIELDS if mode == "grid" else REGION_HW_FIELDS


def row_specs(meta: StoreMetadata) -> Dict[str, Tuple[np.dtype, Tuple[int, ...]]]:
    """dtype and per-row trailing shape of every ``rows/*`` dataset of a store."""
    specs: Dict[str, Tuple[np.dtype, Tuple[int, ...]]] = {
        "features": (np.dtype(meta.dtype), (meta.feature_dim,)),
    }
    if meta.mode == "region":
        specs.update(
            boxes=(np.dtype(np.float32), (4,)),
            scores=(np.dtype(np.float32), ()),
            classes=(np.dtype(np.int32), ()),
            attr_ids=(np.dtype(np.int32), (meta.attr_topk,)),
            attr_scores=(np.dtype(np.float32), (meta.attr_topk,)),
        )
    return specs


@dataclass
class StoreIndex:
    """The ``index/*`` datasets of one file, in memory (lookups must not scan the file)."""

    image_ids: List[str]
    offset: np.ndarray  # [N] int64
    count: np.ndarray  # [N] int32
    hw: Dict[str, np.ndarray]  # name -> [N,2] int32 (image_hw, input_hw, grid_hw in grid mode)

    def __len__(self) -> int:
        return len(self.image_ids)


def read_index(f: h5py.File, mode: str) -> StoreIndex:
    """Load ``index/*`` of an open store file and check it points only at existing rows."""
    try:
        ids = [str(x) for x in f["index/image_id"].asstr()[()]]
        offset = np.asarray(f["index/offset"][()], dtype=np.int64)
        count = np.asarray(f["index/count"][()], dtype=np.int32)
        hw = {
            name: np.asarray(f[f"index/{name}"][()], dtype=np.int32).reshape(-1, 2)
            for name in hw_fields(mode)
        }
    except KeyError as exc:
        raise StoreFormatError(f"{f.filename}: store index is incomplete ({exc})") from None
    n = len(ids)
    if offset.shape != (n,) or count.shape != (n,) or any(len(a) != n for a in hw.values()):
        raise StoreFormatError(f"{f.filename}: index datasets have different lengths")
    total_rows = f["rows/features"].shape[0]
    if n and (offset.min() < 0 or count.min() < 0 or int((offset + count).max()) > total_rows):
        raise StoreFormatError(
            f"{f.filename}: index points outside rows/features ({total_rows} rows)"
        )
    return StoreIndex(image_ids=ids, offset=offset, count=count, hw=hw)


def read_errors(f: h5py.File) -> List[Tuple[str, str]]:
    """``errors/*`` of an open store file as (image_id, reason) pairs."""
    if "errors/image_id" not in f:
        return []
    ids = f["errors/image_id"].asstr()[()]
    reasons = f["errors/reason"].asstr()[()]
    return [(str(i), str(r)) for i, r in zip(ids, reasons)]


def open_store_file(path: str, rdcc_nbytes: int = 16 << 20) -> h5py.File:
    """Open a store file read-only, with clear errors for missing, non-file or non-HDF5 paths."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"feature store not found: {path}")
    if os.path.isdir(path):
        raise StoreFormatError(f"{path}: is a directory, not a feature store file")
    try:
        return h5py.File(path, "r", rdcc_nbytes=rdcc_nbytes)
    except OSError as exc:
        raise StoreFormatError(f"{path}: cannot be opened as HDF5 ({exc})") from None
