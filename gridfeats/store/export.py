"""Export a feature store to the on-disk layouts other projects' loaders read.

Each format reproduces what the target code expects (checked against its loader):

``gridfeats-pth`` (grid only) - grid-feats-vqa ``extract_grid_feature.py``: one ``<name>.pth`` per
    image, ``torch.save`` of a float32 tensor ``[1, D, h, w]``.
``mmf`` - MMF ``PaddedFasterRCNNFeatureReader``: ``<name>.npy`` float32 ``[N, D]`` and
    ``<name>_info.npy``, a pickled dict with ``image_id``, ``image_width``, ``image_height``,
    ``num_boxes``, ``bbox [N,4]`` and, for regions, ``objects [N]`` (0-based classes, no
    background). MMF's extractor also writes ``cls_prob`` (full class distribution), which a store
    does not keep.
``mmf-lmdb`` - MMF ``LMDBFeatureReader`` / ``lmdb_conversion.py``: ``<store>.lmdb`` whose key
    ``b"keys"`` holds a pickled list of byte keys (``<name>``) and each key a pickled dict with
    ``feature_path``, ``features`` and the info fields above (``cls_prob`` is None).
``mcan-npz`` - MCAN / OpenVQA: ``<name>.npz`` with ``x`` **transposed** to ``[D, N]`` (loaders call
    ``x.transpose((1, 0))``), ``bbox [N,4]``, ``num_bbox``, ``image_h``, ``image_w``. Their loaders
    parse the image id as ``int(basename.split('_')[-1].split('.')[0])``, so names must end in a
    number (e.g. ``--name-format 'COCO_train2014_{number:012d}'``).
``sc-npz`` - self-critical.pytorch (``make_bu_data.py`` layout): ``att/<name>.npz`` with key
    ``feat`` (regions ``[K, D]``, grids ``[h, w, D]``; the loader reshapes to ``[-1, D]``),
    ``fc/<name>.npy`` the mean feature ``[D]``, and for regions ``box/<name>.npy`` ``[K, 4]``.
``sc-h5`` - self-critical's h5 ``HybridLoader``: ``att.h5``, ``fc.h5`` (and ``box.h5``) with one
    dataset per image named ``<name>``.
``bua-tsv`` - bottom-up-attention ``generate_tsv.py``: ``<store>.tsv``, tab separated, no header,
    fields ``image_id, image_w, image_h, num_boxes, boxes, features``, the last two base64 of
    float32 ``[N,4]`` and ``[N,D]`` buffers. Images with no boxes are skipped (and reported): the
    readers' ``reshape((0, -1))`` fails on them.

Grid stores exported to box-based formats use the grid cells as boxes: the original image divided
evenly into ``h x w`` cells, in the same row-major order as the rows.

Names: ``--name-format`` is a ``str.format`` template with ``image_id`` (the id with a known image
extension removed), ``basename`` (its last path component) and ``number`` (the id as an int, for
numeric ids). Names may contain ``/`` (sub-folders) but never ``..`` or an absolute path.
Every file is written to a temporary name and renamed, so an interrupted export leaves no torn
files.
"""

from __future__ import annotations

import base64
import functools
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from gridfeats.store.errors import StoreError
from gridfeats.store.reader import FeatureStore

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUA_TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class ExportReport:
    """What an export wrote and what it could not."""

    format: str
    outputs: List[str] = field(default_factory=list)  # top-level files or folders written
    written: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (image id, reason)


# --- names ---------------------------------------------------------------------------------------
def image_name(image_id: str, name_format: str = "{image_id}") -> str:
    """The file name (without extension) of an image in an export; see the module docstring."""
    stem = image_id
    if stem.lower().endswith(IMAGE_EXTENSIONS):
        stem = os.path.splitext(stem)[0]
    fields = {"image_id": stem, "basename": stem.replace("\\", "/").rsplit("/", 1)[-1]}
    if stem.isdigit():
        fields["number"] = int(stem)
    try:
        name = name_format.format(**fields)
    except KeyError as exc:
        if exc.args and exc.args[0] == "number":
            raise StoreError(
                f"--name-format uses {{number}} but image id {image_id!r} is not a number"
            ) from None
        raise StoreError(
            f"--name-format {name_format!r} uses an unknown field {exc}; use image_id, basename or "
            "number"
        ) from None
    except (ValueError, IndexError) as exc:
        raise StoreError(
            f"--name-format {name_format!r} is not a valid format string: {exc}"
        ) from None
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(
            f"image {image_id!r} gives the unsafe export name {name!r}; choose another "
            "--name-format"
        )
    return "/".join(parts)


def _mcan_image_id(name: str) -> Optional[int]:
    """The id MCAN/OpenVQA parse back from a file name (None when they cannot)."""
    try:
        return int(os.path.basename(name + ".npz").split("_")[-1].split(".")[0])
    except ValueError:
        return None


# --- shared pieces --------------------------------------------------------------------------------
def grid_cell_boxes(grid_hw: np.ndarray, image_hw: np.ndarray) -> np.ndarray:
    """xyxy boxes (original pixels) of the ``h x w`` grid cells, in row-major order."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    height, width = float(image_hw[0]), float(image_hw[1])
    ys = np.arange(h + 1, dtype=np.float64) * height / h
    xs = np.arange(w + 1, dtype=np.float64) * width / w
    y1, x1 = np.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y2, x2 = np.meshgrid(ys[1:], xs[1:], indexing="ij")
    return np.stack([x1, y1, x2, y2], axis=-1).reshape(h * w, 4).astype(np.float32)


@dataclass
class ImageView:
    """One image prepared for export: float32 features and boxes, whatever the store mode."""

    image_id: str
    name: str
    features: np.ndarray  # [N, D] float32
    boxes: np.ndarray  # [N, 4] float32 (grid cells in grid mode)
    classes: Optional[np.ndarray]  # [N] int (region mode)
    image_hw: np.ndarray
    grid_hw: Optional[np.ndarray]


def _views(store: FeatureStore, name_format: str) -> Iterator[ImageView]:
    seen: Dict[str, str] = {}
    for image_id in store:
        name = image_name(image_id, name_format)
        if name in seen:
            raise StoreError(
                f"images {seen[name]!r} and {image_id!r} both export as {name!r}; change "
                "--name-format"
            )
        seen[name] = image_id
        item = store[image_id]
        grid = store.mode == "grid"
        yield ImageView(
            image_id=image_id,
            name=name,
            features=np.asarray(item["features"], dtype=np.float32),
            boxes=grid_cell_boxes(item["grid_hw"], item["image_hw"])
            if grid
            else item["boxes"].astype(np.float32),
            classes=None if grid else item["classes"],
            image_hw=item["image_hw"],
            grid_hw=item["grid_hw"] if grid else None,
        )


def _write_atomically(path: str, write: Callable[[object], None], binary: bool = True) -> None:
    """Write a file through ``write(fileobj)`` under a temporary name, then rename it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(
            tmp, "wb" if binary else "w", **({} if binary else {"encoding": "ascii", "newline": ""})
        ) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _replace_dir_atomically(path: str, build: Callable[[str], None]) -> None:
    """Build a folder (e.g. an lmdb environment) next to ``path``, then swap it in."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        if os.path.isdir(path):
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _store_stem(store: FeatureStore) -> str:
    return os.path.splitext(os.path.basename(store.path))[0]


# --- formats --------------------------------------------------------------------------------------
def _export_gridfeats_pth(
    store: FeatureStore, out_dir: str, name_format: str, report: ExportReport
) -> None:
    import torch

    if store.mode != "grid":
        raise StoreError("gridfeats-pth holds grid feature maps; this store is in region mode")
    for view in _views(store, name_format):
        h, w = int(view.grid_hw[0]), int(view.grid_hw[1])
        fmap = torch.from_numpy(np.ascontiguousarray(view.features.T.reshape(1, -1, h, w)))
        _write_atomically(
            os.path.join(out_dir, view.name + ".pth"), functools.partial(torch.save, fmap)
        )
        report.written += 1
    report.outputs.append(out_dir)


def _mmf_info(view: ImageView) -> Dict[str, object]:
    info: Dict[str, object] = {
        "image_id": view.name,
        "image_width": int(view.image_hw[1]),
        "image_height": int(view.image_hw[0]),
        "num_boxes": int(view.features.shape[0]),
        "bbox": view.boxes,
    }
    if view.classes is not None:
        info["objects"] = view.classes.astype(np.int64)
    return info


def _export_mmf(store: FeatureStore, out_dir: str, name_format: str, report: ExportReport) -> None:
    for view in _views(store, name_format):
        base = os.path.join(out_dir, view.name)
        info = _mmf_info(view)
        _write_atomically(base + ".npy", functools.partial(np.save, arr=view.features))
        _write_atomically(
            base + "_info.npy",
            functools.partial(np.save, arr=np.array(info, dtype=object), allow_pickle=True),
        )
        report.written += 1
    report.outputs.append(out_dir)


def _export_mmf_lmdb(
    store: FeatureStore, out_dir: str, name_format: str, report: ExportReport
) -> None:
    try:
        import lmdb
    except ImportError:
        raise StoreError("mmf-lmdb needs the 'lmdb' package: pip install lmdb") from None
    path = os.path.join(out_dir, _store_stem(store) + ".lmdb")
    row_bytes = 4 * (store.feature_dim + 8)
    total_rows = sum(store.count(i) for i in store)
    map_size = 2 * (total_rows * row_bytes + 4096 * (len(store) + 1)) + (64 << 20)

    def build(tmp: str) -> None:
        env = lmdb.open(tmp, map_size=map_size, subdir=True)
        keys: List[bytes] = []
        try:
            with env.begin(write=True) as txn:
                for view in _views(store, name_format):
                    item = {"feature_path": view.name, "features": view.features, "cls_prob": None}
                    item.update(_mmf_info(view))
                    item.pop("image_id")
                    item.setdefault("objects", None)
                    key = view.name.encode("utf-8")
                    txn.put(key, pickle.dumps(item, protocol=4))
                    keys.append(key)
                    report.written += 1
                txn.put(b"keys", pickle.dumps(keys, protocol=4))
            env.sync()
        finally:
            env.close()

    os.makedirs(out_dir, exist_ok=True)
    _replace_dir_atomically(path, build)
    report.outputs.append(path)


def _export_mcan_npz(
    store: FeatureStore, out_dir: str, name_format: str, report: ExportReport
) -> None:
    for view in _views(store, name_format):
        if _mcan_image_id(view.name) is None:
            raise StoreError(
                f"MCAN/OpenVQA read the image id from the file name's last '_' part; {view.name!r} "
                "has none. Use e.g. --name-format 'COCO_train2014_{number:012d}'"
            )
        arrays = {
            "x": np.ascontiguousarray(view.features.T),  # [D, N]: the loaders transpose back
            "bbox": view.boxes,
            "num_bbox": np.int64(view.features.shape[0]),
            "image_h": np.int64(view.image_hw[0]),
            "image_w": np.int64(view.image_hw[1]),
        }
        _write_atomically(
            os.path.join(out_dir, view.name + ".npz"),
            functools.partial(np.savez_compressed, **arrays),
        )
        report.written += 1
    report.outputs.append(out_dir)


def _sc_att(view: ImageView) -> np.ndarray:
    if view.grid_hw is None:
        return view.features
    h, w = int(view.grid_hw[0]), int(view.grid_hw[1])
    return view.features.reshape(h, w, -1)  # HWC, as self-critical's prepro_feats writes grids


def _export_sc_npz(
    store: FeatureStore, out_dir: str, name_format: str, report: ExportReport
) -> None:
    for view in _views(store, name_format):
        att = _sc_att(view)
        fc = (
            view.features.mean(axis=0)
            if len(view.features)
            else np.zeros(store.feature_dim, np.float32)
        )
        _write_atomically(
            os.path.join(out_dir, "att", view.name + ".npz"),
            functools.partial(np.savez_compressed, feat=att),
        )
        _write_atomically(
            os.path.join(out_dir, "fc", view.name + ".npy"),
            functools.partial(np.save, arr=fc.astype(np.float32)),
        )
        if store.mode == "region":
            _write_atomically(
                os.path.join(out_dir, "box", view.name + ".npy"),
                functools.partial(np.save, arr=view.boxes),
            )
        report.written += 1
    kinds = ("att", "fc", "box") if store.mode == "region" else ("att", "fc")
    report.outputs.extend(os.path.join(out_dir, k) for k in kinds)


def _export_sc_h5(
    store: FeatureStore, out_dir: str, name_format: str, report: ExportReport
) -> None:
    import h5py

    kinds = ("att", "fc", "box") if store.mode == "region" else ("att", "fc")
    os.makedirs(out_dir, exist_ok=True)
    finals = {k: os.path.join(out_dir, f"{k}.h5") for k in kinds}
    tmps = {k: f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" for k, p in finals.items()}
    files = {k: h5py.File(p, "w") for k, p in tmps.items()}
    try:
        for view in _views(store, name_format):
            files["att"].create_dataset(view.name, data=_sc_att(view))
            fc = (
                view.features.mean(axis=0)
                if len(view.features)
                else np.zeros(store.feature_dim, np.float32)
            )
            files["fc"].create_dataset(view.name, data=fc.astype(np.float32))
            if "box" in files:
                files["box"].create_dataset(view.name, data=view.boxes)
            report.written += 1
        for f in files.values():
            f.close()
        for k in kinds:
            os.replace(tmps[k], finals[k])
    except BaseException:
        for f in files.values():
            f.close()
        for p in tmps.values():
            if os.path.exists(p):
                os.unlink(p)
        raise
    report.outputs.extend(finals[k] for k in kinds)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode("ascii")


def _export_bua_tsv(
    store: FeatureStore, out_dir: str, name_format: str, report: ExportReport
) -> None:
    path = os.path.join(out_dir, _store_stem(store) + ".tsv")

    def write(fh) -> None:
        for view in _views(store, name_format):
            n = int(view.features.shape[0])
            if n == 0:
                report.skipped.append(
                    (view.image_id, "no boxes (bua-tsv readers cannot parse empty rows)")
                )
                continue
            values = (
                view.name,
                int(view.image_hw[1]),
                int(view.image_hw[0]),
                n,
                _b64(view.boxes),
                _b64(view.features),
            )
            fh.write("\t".join(str(v) for v in values) + "\r\n")
            report.written += 1

    _write_atomically(path, write, binary=False)
    report.outputs.append(path)


@dataclass(frozen=True)
class ExportFormat:
    name: str
    help: str
    run: Callable[[FeatureStore, str, str, ExportReport], None]


FORMATS: Dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            "gridfeats-pth",
            "grid-feats-vqa: <name>.pth, float32 tensor [1,D,h,w] (grid only)",
            _export_gridfeats_pth,
        ),
        ExportFormat("mmf", "MMF: <name>.npy [N,D] + <name>_info.npy", _export_mmf),
        ExportFormat(
            "mmf-lmdb", "MMF: one <store>.lmdb with pickled items and b'keys'", _export_mmf_lmdb
        ),
        ExportFormat(
            "mcan-npz",
            "MCAN/OpenVQA: <name>.npz with x [D,N], bbox, image_h, image_w",
            _export_mcan_npz,
        ),
        ExportFormat(
            "sc-npz",
            "self-critical: att/<name>.npz (feat), fc/<name>.npy, box/<name>.npy",
            _export_sc_npz,
        ),
        ExportFormat(
            "sc-h5",
            "self-critical: att.h5, fc.h5, box.h5 with one dataset per image",
            _export_sc_h5,
        ),
        ExportFormat(
            "bua-tsv",
            "bottom-up-attention: <store>.tsv with base64 boxes and features",
            _export_bua_tsv,
        ),
    )
}


def export_store(
    store: "FeatureStore | str", out_dir: str, fmt: str, name_format: str = "{image_id}"
) -> ExportReport:
    """Write ``store`` (a FeatureStore or a path) into ``out_dir`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise StoreError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    if not isinstance(store, FeatureStore):
        store = FeatureStore(store)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise StoreError(f"output {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    report = ExportReport(format=fmt)
    FORMATS[fmt].run(store, out_dir, name_format, report)
    return report


__all__ = [
    "BUA_TSV_FIELDS",
    "ExportReport",
    "FORMATS",
    "export_store",
    "grid_cell_boxes",
    "image_name",
]
