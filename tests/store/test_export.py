"""Exporters: each output is read back the way its target project's loader reads it.

The loader logic below is re-implemented minimally from those projects' documented behaviour
(file names, keys, shapes, transposes), not imported from them.
"""

from __future__ import annotations

import base64
import csv
import glob
import io
import os
import pickle
import sys

import h5py
import numpy as np
import pytest

from gridfeats.store import (
    FeatureStore,
    FeatureWriter,
    StoreError,
    StoreMetadata,
    grid_record,
    region_record,
)
from gridfeats.store.export import FORMATS, export_store, grid_cell_boxes, image_name

D = 16
TOPK = 2
REGION_COUNTS = {"9": 5, "139": 3, "7": 0, "42": 10}


@pytest.fixture(scope="module")
def region_store(tmp_path_factory) -> FeatureStore:
    path = str(tmp_path_factory.mktemp("region") / "val.h5")
    meta = StoreMetadata(mode="region", feature_dim=D, attr_topk=TOPK)
    with FeatureWriter(path, meta, commit_every=2) as writer:
        for n, (image_id, k) in enumerate(REGION_COUNTS.items()):
            rng = np.random.default_rng(n)
            x1y1 = rng.uniform(0, 50, (k, 2))
            writer.add(
                image_id,
                region_record(
                    features=rng.standard_normal((k, D)),
                    boxes=np.concatenate([x1y1, x1y1 + rng.uniform(1, 40, (k, 2))], axis=1),
                    scores=rng.uniform(0.2, 1, k),
                    classes=rng.integers(0, 1600, k),
                    attr_ids=rng.integers(0, 400, (k, TOPK)),
                    attr_scores=rng.uniform(0, 1, (k, TOPK)),
                    image_hw=(100 + n, 150 + n),
                    input_hw=(600, 900),
                ),
            )
        writer.add_error("13", "not an image")
    return FeatureStore(path)


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory) -> FeatureStore:
    path = str(tmp_path_factory.mktemp("grid") / "grid.h5")
    meta = StoreMetadata(mode="grid", feature_dim=D, dtype="float16")
    with FeatureWriter(path, meta) as writer:
        for n, image_id in enumerate(["139", "285"]):
            fmap = np.random.default_rng(n).standard_normal((D, 3 + n, 4)).astype(np.float32)
            writer.add(image_id, grid_record(fmap, (90 + n, 120), (600, 800)))
    return FeatureStore(path)


def rows(store: FeatureStore, image_id: str) -> np.ndarray:
    return store[image_id]["features"].astype(np.float32)


# --- grid-feats-vqa -------------------------------------------------------------------------------
def test_gridfeats_pth_is_a_float32_1xDxhxw_tensor_per_image(grid_store, tmp_path):
    torch = pytest.importorskip("torch")
    report = export_store(grid_store, str(tmp_path), "gridfeats-pth")
    assert report.written == 2
    for image_id in grid_store:
        tensor = torch.load(
            os.path.join(tmp_path, "%d.pth" % int(image_id))
        )  # their '%d.pth' % image_id
        h, w = grid_store[image_id]["grid_hw"]
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (1, D, h, w)
        np.testing.assert_array_equal(
            tensor[0].numpy(), grid_store.grid(image_id, dtype=np.float32)
        )


def test_gridfeats_pth_refuses_region_stores(region_store, tmp_path):
    with pytest.raises(StoreError, match="region mode"):
        export_store(region_store, str(tmp_path), "gridfeats-pth")


# --- MMF ------------------------------------------------------------------------------------------
def mmf_padded_read(feature_path: str, max_loc: int):
    """MMF PaddedFasterRCNNFeatureReader: .npy features plus the pickled dict in _info.npy."""
    info = {"features": np.load(feature_path, allow_pickle=True)}
    info_path = "{}_info.npy".format(feature_path.split(".npy")[0])
    if os.path.exists(info_path):
        info.update(np.load(info_path, allow_pickle=True).item())
    feature = info.pop("features")
    loc, dim = feature.shape
    padded = np.zeros((max_loc, dim), dtype=np.float32)
    padded[:loc] = feature[:max_loc]
    return padded, loc, info


def test_mmf_npy_and_info(region_store, tmp_path):
    export_store(region_store, str(tmp_path), "mmf")
    for image_id, k in REGION_COUNTS.items():
        padded, loc, info = mmf_padded_read(os.path.join(tmp_path, f"{image_id}.npy"), max_loc=100)
        item = region_store[image_id]
        assert loc == k and info["num_boxes"] == k
        np.testing.assert_array_equal(padded[:k], rows(region_store, image_id))
        assert not padded[k:].any()
        np.testing.assert_array_equal(info["bbox"], item["boxes"])
        np.testing.assert_array_equal(info["objects"], item["classes"])
        assert (info["image_height"], info["image_width"]) == tuple(item["image_hw"])
    assert not os.path.exists(tmp_path / "13.npy")  # failed inputs have no features


def test_mmf_grid_uses_cells_as_boxes(grid_store, tmp_path):
    export_store(grid_store, str(tmp_path), "mmf")
    padded, loc, info = mmf_padded_read(os.path.join(tmp_path, "285.npy"), max_loc=50)
    h, w = grid_store["285"]["grid_hw"]
    assert loc == h * w and info["bbox"].shape == (h * w, 4)
    np.testing.assert_array_equal(padded[:loc], rows(grid_store, "285"))
    height, width = grid_store["285"]["image_hw"]
    np.testing.assert_allclose(info["bbox"][0], [0, 0, width / w, height / h], rtol=1e-6)
    np.testing.assert_allclose(
        info["bbox"][-1], [width - width / w, height - height / h, width, height], rtol=1e-6
    )


def test_grid_cell_boxes_follow_row_order():
    boxes = grid_cell_boxes(np.array([2, 3]), np.array([20, 30]))
    # row y*w + x is cell (y, x): the second row is (0, 1), the fourth (1, 0)
    np.testing.assert_array_equal(boxes[1], [10, 0, 20, 10])
    np.testing.assert_array_equal(boxes[3], [0, 10, 10, 20])


def test_mmf_lmdb_read_like_lmdb_feature_reader(region_store, tmp_path):
    lmdb = pytest.importorskip("lmdb")
    report = export_store(region_store, str(tmp_path), "mmf-lmdb")
    db_path = os.path.join(tmp_path, "val.lmdb")
    assert report.outputs == [db_path] and db_path.endswith(".lmdb")
    env = lmdb.open(
        db_path,
        subdir=os.path.isdir(db_path),
        readonly=True,
        lock=False,
        readahead=False,
        meminit=False,
    )
    with env.begin(write=False, buffers=True) as txn:
        keys = pickle.loads(txn.get(b"keys"))
        indices = {key: i for i, key in enumerate(keys)}
        for image_id, k in REGION_COUNTS.items():
            split = os.path.relpath(os.path.join(db_path, f"{image_id}.npy"), db_path).split(
                ".npy"
            )[0]
            key = keys[indices[str(int(split.split("_")[-1])).encode()]]
            item = pickle.loads(txn.get(key))
            np.testing.assert_array_equal(item["features"], rows(region_store, image_id))
            assert item["num_boxes"] == k and item["feature_path"] == image_id
            np.testing.assert_array_equal(item["bbox"], region_store[image_id]["boxes"])
            assert item["image_width"] == region_store[image_id]["image_hw"][1]
    env.close()


# --- MCAN / OpenVQA -------------------------------------------------------------------------------
def test_mcan_npz_is_transposed_and_named_for_their_id_parser(region_store, tmp_path):
    export_store(region_store, str(tmp_path), "mcan-npz", name_format="COCO_val2014_{number:012d}")
    paths = glob.glob(str(tmp_path) + "/" + "*.npz")
    iid_to_path = {str(int(p.split("/")[-1].split("_")[-1].split(".")[0])): p for p in paths}
    assert set(iid_to_path) == set(REGION_COUNTS)
    for image_id, k in REGION_COUNTS.items():
        assert os.path.basename(iid_to_path[image_id]) == f"COCO_val2014_{int(image_id):012d}.npz"
        feat = np.load(iid_to_path[image_id])
        assert feat["x"].shape == (D, k)  # stored transposed
        np.testing.assert_array_equal(feat["x"].transpose((1, 0)), rows(region_store, image_id))
        np.testing.assert_array_equal(feat["bbox"], region_store[image_id]["boxes"])
        assert (int(feat["image_h"]), int(feat["image_w"])) == tuple(
            region_store[image_id]["image_hw"]
        )
        assert int(feat["num_bbox"]) == k


def test_mcan_npz_refuses_names_their_parser_cannot_read(tmp_path):
    path = str(tmp_path / "named.h5")
    with FeatureWriter(path, StoreMetadata(mode="grid", feature_dim=D)) as writer:
        writer.add("photos/cat.jpg", grid_record(np.ones((D, 1, 1)), (5, 5), (5, 5)))
    with pytest.raises(StoreError, match="name-format"):
        export_store(path, str(tmp_path / "out"), "mcan-npz")


# --- self-critical captioning ---------------------------------------------------------------------
def sc_load_npz(att_dir: str, key: str) -> np.ndarray:
    """HybridLoader for a folder with ext .npz: open(key + ext).read(), np.load(...)['feat']."""
    with open(os.path.join(att_dir, key + ".npz"), "rb") as fh:
        return np.load(io.BytesIO(fh.read()))["feat"]


def test_sc_npz_att_fc_box(region_store, grid_store, tmp_path):
    export_store(region_store, str(tmp_path / "r"), "sc-npz")
    for image_id, k in REGION_COUNTS.items():
        att = sc_load_npz(str(tmp_path / "r" / "att"), image_id)
        att = att.reshape(-1, att.shape[-1])
        np.testing.assert_array_equal(att, rows(region_store, image_id))
        fc = np.load(tmp_path / "r" / "fc" / f"{image_id}.npy")
        assert fc.shape == (D,)
        if k:
            np.testing.assert_allclose(fc, rows(region_store, image_id).mean(0), rtol=1e-6)
        box = np.load(tmp_path / "r" / "box" / f"{image_id}.npy")
        np.testing.assert_array_equal(box, region_store[image_id]["boxes"])

    export_store(grid_store, str(tmp_path / "g"), "sc-npz")
    att = sc_load_npz(str(tmp_path / "g" / "att"), "285")
    h, w = grid_store["285"]["grid_hw"]
    assert att.shape == (h, w, D)  # HWC like their grid prepro; the loader flattens to [h*w, D]
    np.testing.assert_array_equal(att.reshape(-1, D), rows(grid_store, "285"))
    assert not os.path.exists(tmp_path / "g" / "box")


def test_sc_h5_one_dataset_per_image(region_store, tmp_path):
    export_store(region_store, str(tmp_path), "sc-h5")
    for image_id in REGION_COUNTS:
        att = np.array(h5py.File(tmp_path / "att.h5", "r")[image_id]).astype("float32")
        np.testing.assert_array_equal(
            att.reshape(-1, att.shape[-1]) if att.size else att, rows(region_store, image_id)
        )
        box = np.array(h5py.File(tmp_path / "box.h5", "r")[image_id])
        np.testing.assert_array_equal(box, region_store[image_id]["boxes"])
        assert np.array(h5py.File(tmp_path / "fc.h5", "r")[image_id]).shape == (D,)


# --- bottom-up-attention tsv ----------------------------------------------------------------------
def test_bua_tsv_fields_and_base64(region_store, tmp_path):
    report = export_store(region_store, str(tmp_path), "bua-tsv")
    assert report.skipped == [("7", "no boxes (bua-tsv readers cannot parse empty rows)")]
    fieldnames = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
    csv.field_size_limit(sys.maxsize)
    seen = set()
    with open(tmp_path / "val.tsv", "r") as tsv:
        for item in csv.DictReader(tsv, delimiter="\t", fieldnames=fieldnames):
            image_id = str(int(item["image_id"]))
            n = int(item["num_boxes"])
            for name in ("boxes", "features"):
                item[name] = np.frombuffer(base64.b64decode(item[name]), dtype=np.float32).reshape(
                    (n, -1)
                )
            np.testing.assert_array_equal(item["features"], rows(region_store, image_id))
            np.testing.assert_array_equal(item["boxes"], region_store[image_id]["boxes"])
            assert (int(item["image_h"]), int(item["image_w"])) == tuple(
                region_store[image_id]["image_hw"]
            )
            seen.add(image_id)
    assert seen == {i for i, k in REGION_COUNTS.items() if k}


# --- names and the command line -------------------------------------------------------------------
def test_image_names():
    assert image_name("139") == "139"
    assert image_name("139", "COCO_val2014_{number:012d}") == "COCO_val2014_000000000139"
    assert image_name("train/a.JPG") == "train/a"
    assert image_name("train/a.jpg", "{basename}") == "a"
    for bad_id, fmt, message in [
        ("../x", "{image_id}", "unsafe"),
        ("/abs", "{image_id}", "unsafe"),
        ("cat", "{number}", "not a number"),
        ("1", "{nope}", "unknown field"),
        ("1", "{image_id", "not a valid format"),
    ]:
        with pytest.raises(StoreError, match=message):
            image_name(bad_id, fmt)


def test_names_that_collide_are_refused(tmp_path):
    path = str(tmp_path / "dup.h5")
    with FeatureWriter(path, StoreMetadata(mode="grid", feature_dim=D)) as writer:
        writer.add("a/x.jpg", grid_record(np.ones((D, 1, 1)), (5, 5), (5, 5)))
        writer.add("b/x.jpg", grid_record(np.ones((D, 1, 1)), (5, 5), (5, 5)))
    with pytest.raises(StoreError, match="both export as 'x'"):
        export_store(path, str(tmp_path / "out"), "mmf", name_format="{basename}")


def test_cli_lists_every_format_and_reports_errors(region_store, tmp_path, capsys):
    import argparse

    from gridfeats.cli import main
    from gridfeats.store.cli_export import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (fmt,) = [a for a in parser._actions if a.dest == "fmt"]
    assert fmt.choices == tuple(FORMATS)
    assert (
        main(
            [
                "export",
                "--format",
                "mcan-npz",
                region_store.path,
                str(tmp_path / "m"),
                "--name-format",
                "img_{number}",
            ]
        )
        == 0
    )
    assert "exported 4 images as mcan-npz" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "m" / "img_139.npz")
    assert (
        main(["export", "--format", "gridfeats-pth", region_store.path, str(tmp_path / "p")]) == 2
    )
    assert "region mode" in capsys.readouterr().err
    assert (
        main(["export", "--format", "mmf", str(tmp_path / "missing.h5"), str(tmp_path / "x")]) == 2
    )
    assert "not found" in capsys.readouterr().err
