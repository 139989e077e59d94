"""Feature store: writer/reader round trips, resume rules, errors, merge, DataLoader workers."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest

from gridfeats.store import (
    AsyncFeatureWriter,
    FeatureStore,
    FeatureWriter,
    MergeConflictError,
    StoreBusyError,
    StoreError,
    StoreFormatError,
    StoreIncompleteError,
    StoreMetadata,
    StoreMismatchError,
    grid_record,
    merge_stores,
    region_record,
)

D = 16
TOPK = 3


def grid_meta(**kw) -> StoreMetadata:
    return StoreMetadata(
        mode="grid", feature_dim=D, config="MODEL:\n  X: 1\n", weights_sha256="ab" * 32, **kw
    )


def region_meta(**kw) -> StoreMetadata:
    return StoreMetadata(mode="region", feature_dim=D, attr_topk=TOPK, config="R: 1\n", **kw)


def grid_map(i: int) -> np.ndarray:
    """A deterministic [D,h,w] map per image index, with sizes varying by image."""
    rng = np.random.default_rng(i)
    return rng.standard_normal((D, 2 + i % 3, 3 + i % 2)).astype(np.float32) * 4


def make_region(i: int) -> dict:
    rng = np.random.default_rng(1000 + i)
    k = i % 5  # includes an image with no boxes
    return region_record(
        features=rng.standard_normal((k, D)).astype(np.float32),
        boxes=rng.uniform(0, 90, (k, 4)).astype(np.float32),
        scores=rng.uniform(0, 1, k).astype(np.float32),
        classes=rng.integers(0, 1600, k),
        attr_ids=rng.integers(0, 400, (k, TOPK)),
        attr_scores=rng.uniform(0, 1, (k, TOPK)),
        image_hw=(90 + i, 120),
        input_hw=(600, 800 + i),
    )


def write_grid(path, ids, **kw) -> None:
    with FeatureWriter(str(path), grid_meta(**kw.pop("meta_kw", {})), **kw) as writer:
        for i in ids:
            writer.add(str(i), grid_record(grid_map(i), (100 + i, 200), (600, 1000)))


def test_grid_round_trip_keeps_rows_maps_and_metadata(tmp_path):
    out = tmp_path / "grid.h5"
    write_grid(out, range(7), commit_every=3)
    assert not os.path.exists(str(out) + ".parts")
    store = FeatureStore(str(out))
    assert len(store) == 7 and list(store) == [str(i) for i in range(7)]
    assert "3" in store and 3 in store and "99" not in store
    for i in range(7):
        fmap = grid_map(i)
        item = store[i]
        np.testing.assert_array_equal(store.grid(str(i)), fmap)
        # Row y*w + x holds map[:, y, x] (the documented layout).
        h, w = fmap.shape[1:]
        np.testing.assert_array_equal(item["features"][1 * w + 2], fmap[:, 1, 2])
        assert item["grid_hw"].tolist() == [h, w]
        assert item["image_hw"].tolist() == [100 + i, 200]
        assert item["input_hw"].tolist() == [600, 1000]
    assert store.attrs["format"] == "gridfeats.features" and store.attrs["version"] == 1
    assert store.attrs["mode"] == "grid" and store.attrs["feature_dim"] == D
    assert store.attrs["weights_sha256"] == "ab" * 32 and store.attrs["config"].startswith("MODEL:")
    assert store.attrs["created_with"].startswith("gridfeats ")


def test_file_layout_matches_the_contract(tmp_path):
    out = tmp_path / "grid.h5"
    write_grid(out, range(5), commit_every=2, compression="gzip")
    with h5py.File(out, "r") as f:
        counts = f["index/count"][()]
        offsets = f["index/offset"][()]
        assert f["index/image_id"].dtype.kind == "O" and f["index/offset"].dtype == np.int64
        assert f["index/count"].dtype == np.int32 and f["index/grid_hw"].shape == (5, 2)
        np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)[:-1]]))
        assert f["rows/features"].shape == (counts.sum(), D)
        assert f["rows/features"].compression == "gzip" and f["rows/features"].shuffle
        assert f["rows/features"].chunks is not None
        assert f["errors/image_id"].shape == (0,) and f["errors/reason"].shape == (0,)
        assert "rows/boxes" not in f


def test_region_round_trip_and_empty_detections(tmp_path):
    out = tmp_path / "region.h5"
    with FeatureWriter(str(out), region_meta(), compression="lzf", commit_every=4) as writer:
        for i in range(9):
            writer.add(f"dir/img{i}.jpg", make_region(i))
    store = FeatureStore(str(out))
    assert len(store) == 9
    for i in range(9):
        want, got = make_region(i), store[f"dir/img{i}.jpg"]
        assert set(got) == {
            "features",
            "boxes",
            "scores",
            "classes",
            "attr_ids",
            "attr_scores",
            "image_hw",
            "input_hw",
        }
        for key in want:
            np.testing.assert_array_equal(got[key], want[key].astype(got[key].dtype))
        assert got["classes"].dtype == np.int32 and got["boxes"].dtype == np.float32
        assert got["attr_ids"].shape == (i % 5, TOPK)
    assert store.count("dir/img0.jpg") == 0
    with pytest.raises(ValueError, match="grid store"):
        store.grid("dir/img1.jpg")


def test_float16_storage_and_overflow_refused(tmp_path):
    out = tmp_path / "half.h5"
    write_grid(out, range(3), meta_kw={"dtype": "float16"})
    store = FeatureStore(str(out))
    assert store.meta.dtype == "float16" and store[0]["features"].dtype == np.float16
    np.testing.assert_array_equal(store.grid(1), grid_map(1).astype(np.float16))
    assert store.grid(1, dtype=np.float32).dtype == np.float32
    writer = FeatureWriter(str(tmp_path / "ovf.h5"), grid_meta(dtype="float16"))
    with pytest.raises(ValueError, match="overflows float16"):
        writer.add("big", grid_record(np.full((D, 1, 1), 1e6, np.float32), (1, 1), (1, 1)))
    writer.close()


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {
                "features": np.zeros((6, D)),
                "grid_hw": (2, 2),
                "image_hw": (1, 1),
                "input_hw": (1, 1),
            },
            "does not match",
        ),
        (
            {
                "features": np.zeros((4, D + 1)),
                "grid_hw": (2, 2),
                "image_hw": (1, 1),
                "input_hw": (1, 1),
            },
            "shape",
        ),
        ({"features": np.zeros((4, D)), "image_hw": (1, 1), "input_hw": (1, 1)}, "lacks"),
        (
            {
                "features": np.full((1, D), np.nan),
                "grid_hw": (1, 1),
                "image_hw": (1, 1),
                "input_hw": (1, 1),
            },
            "NaN",
        ),
        (
            {
                "features": np.zeros((1, D)),
                "grid_hw": (1, 1),
                "image_hw": (1, 1, 1),
                "input_hw": (1, 1),
            },
            "image_hw",
        ),
        (
            {
                "features": np.zeros((1, D)),
                "grid_hw": (1, 1),
                "image_hw": (1, 1),
                "input_hw": (1, 1),
                "x": 1,
            },
            "unknown",
        ),
    ],
)
def test_bad_records_are_refused_with_the_field_named(tmp_path, record, message):
    with FeatureWriter(str(tmp_path / "bad.h5"), grid_meta()) as writer:
        with pytest.raises(ValueError, match=message):
            writer.add("img", record)
        assert writer.done_ids() == frozenset()


def test_errors_are_recorded_and_skipped_on_resume_unless_retried(tmp_path):
    out = str(tmp_path / "err.h5")
    with FeatureWriter(out, grid_meta()) as writer:
        writer.add("1", grid_record(grid_map(1), (1, 1), (1, 1)))
        writer.add_error("2", "truncated image")
        writer.add_error("3", "not an\nimage")
        with pytest.raises(ValueError, match="already"):
            writer.add("1", grid_record(grid_map(1), (1, 1), (1, 1)))
        with pytest.raises(ValueError, match="already has features"):
            writer.add_error("1", "x")
    assert FeatureStore(out).errors == [("2", "truncated image"), ("3", "not an image")]

    with FeatureWriter(out, grid_meta()) as writer:
        assert writer.done_ids() == {"1", "2", "3"}
    with FeatureWriter(out, grid_meta(), retry_errors=True) as writer:
        assert writer.done_ids() == {"1"}
        writer.add("2", grid_record(grid_map(2), (1, 1), (1, 1)))  # the retry succeeds
        writer.add_error("3", "too many pixels: 9 > 8")  # and this one fails again
    store = FeatureStore(out)
    assert store.ids == ["1", "2"]
    assert store.errors == [("3", "too many pixels: 9 > 8")]


def test_resume_adds_only_missing_images_and_equals_one_run(tmp_path):
    once, twice = tmp_path / "once.h5", tmp_path / "twice.h5"
    write_grid(once, range(10), commit_every=4)
    write_grid(twice, range(6), commit_every=4)
    with FeatureWriter(str(twice), grid_meta(), commit_every=3) as writer:
        done = writer.done_ids()
        assert done == {str(i) for i in range(6)}
        for i in range(10):
            if str(i) not in done:
                writer.add(str(i), grid_record(grid_map(i), (100 + i, 200), (600, 1000)))
    assert_same_content(FeatureStore(str(once)), FeatureStore(str(twice)))


def test_abort_keeps_committed_work_for_the_next_run(tmp_path):
    out = str(tmp_path / "abort.h5")
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureWriter(out, grid_meta(), commit_every=100) as writer:
            writer.add("0", grid_record(grid_map(0), (1, 1), (1, 1)))
            raise RuntimeError("boom")
    assert not os.path.exists(out) and os.path.isdir(out + ".parts")
    with pytest.raises(StoreIncompleteError, match="Re-run"):
        FeatureStore(out)
    with FeatureWriter(out, grid_meta()) as writer:
        assert writer.done_ids() == {"0"}
    assert FeatureStore(out).ids == ["0"]


def test_resume_refuses_different_metadata(tmp_path):
    out = str(tmp_path / "m.h5")
    write_grid(out, range(2))
    for other, field in [
        (
            StoreMetadata(
                mode="grid", feature_dim=D + 1, config=grid_meta().config, weights_sha256="ab" * 32
            ),
            "feature_dim",
        ),
        (grid_meta(dtype="float16"), "dtype"),
        (
            StoreMetadata(
                mode="grid", feature_dim=D, config="OTHER: 2\n", weights_sha256="ab" * 32
            ),
            "config",
        ),
        (
            StoreMetadata(mode="grid", feature_dim=D, config=grid_meta().config, weights_sha256=""),
            "weights_sha256",
        ),
        (region_meta(), "mode"),
    ]:
        with pytest.raises(StoreMismatchError, match=field):
            FeatureWriter(out, other)
    # An unfinished run is protected the same way.
    writer = FeatureWriter(str(tmp_path / "u.h5"), grid_meta())
    writer.add("0", grid_record(grid_map(0), (1, 1), (1, 1)))
    writer.abort()
    with pytest.raises(StoreMismatchError, match="unfinished run"):
        FeatureWriter(str(tmp_path / "u.h5"), grid_meta(dtype="float16"))
    # Overwrite starts over.
    with FeatureWriter(out, grid_meta(dtype="float16"), overwrite=True) as writer:
        assert writer.done_ids() == frozenset()
    assert len(FeatureStore(out)) == 0


def test_second_writer_on_same_output_is_refused(tmp_path):
    out = str(tmp_path / "busy.h5")
    first = FeatureWriter(out, grid_meta())
    with pytest.raises(StoreBusyError, match="another process"):
        FeatureWriter(out, grid_meta())
    first.close()
    FeatureWriter(out, grid_meta()).close()


def test_reader_rejects_files_that_are_not_stores(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreFormatError, match="cannot be opened as HDF5"):
        FeatureStore(str(junk))
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreFormatError, match="not a gridfeats feature store"):
        FeatureStore(str(other))
    with pytest.raises(FileNotFoundError):
        FeatureStore(str(tmp_path / "missing.h5"))
    with pytest.raises(StoreFormatError):  # and a writer will not resume into it either
        FeatureWriter(str(other), grid_meta())


def test_missing_id_raises_key_error_naming_it(tmp_path):
    out = tmp_path / "k.h5"
    write_grid(out, [1])
    with pytest.raises(KeyError, match="'7'"):
        FeatureStore(str(out))[7]


def test_async_writer_matches_sync_writer_and_reports_failures(tmp_path):
    sync_out, async_out = tmp_path / "sync.h5", tmp_path / "async.h5"
    write_grid(sync_out, range(8), commit_every=3)
    with AsyncFeatureWriter(
        FeatureWriter(str(async_out), grid_meta(), commit_every=3), max_pending=2
    ) as writer:
        assert writer.done_ids() == frozenset()
        for i in range(8):
            writer.add(str(i), grid_record(grid_map(i), (100 + i, 200), (600, 1000)))
    assert_same_content(FeatureStore(str(sync_out)), FeatureStore(str(async_out)))

    broken = AsyncFeatureWriter(FeatureWriter(str(tmp_path / "b.h5"), grid_meta()))
    broken.add("x", {"features": np.zeros((3, D))})  # invalid: fails in the thread
    with pytest.raises(RuntimeError, match="writer thread failed") as info:
        broken.close()
    assert isinstance(info.value.__cause__, ValueError)


def test_content_is_independent_of_commit_size_order_and_shards(tmp_path):
    ids = list(range(12))
    reference = tmp_path / "ref.h5"
    write_grid(reference, ids, commit_every=1)
    write_grid(tmp_path / "big.h5", ids[::-1], commit_every=8)
    write_grid(tmp_path / "s0.h5", ids[0::2], commit_every=5)
    write_grid(tmp_path / "s1.h5", ids[1::2], commit_every=5)
    merge_stores(str(tmp_path / "merged.h5"), [str(tmp_path / "s0.h5"), str(tmp_path / "s1.h5")])
    ref = FeatureStore(str(reference))
    assert_same_content(ref, FeatureStore(str(tmp_path / "big.h5")))
    merged = FeatureStore(str(tmp_path / "merged.h5"))
    assert_same_content(ref, merged)
    assert merged.ids == [str(i) for i in ids[0::2] + ids[1::2]]  # documented order: shard by shard


def test_merge_rules(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.h5", "b.h5", "c.h5"))
    write_grid(a, [0, 1, 2])
    with FeatureWriter(b, grid_meta()) as writer:
        writer.add("2", grid_record(grid_map(2), (102, 200), (600, 1000)))  # identical duplicate
        writer.add("3", grid_record(grid_map(3), (103, 200), (600, 1000)))
        writer.add_error("1", "not an image")  # failed in one shard, succeeded in another
        writer.add_error("9", "truncated image")
    merge_stores(str(tmp_path / "ab.h5"), [a, b])
    merged = FeatureStore(str(tmp_path / "ab.h5"))
    assert merged.ids == ["0", "1", "2", "3"] and merged.errors == [("9", "truncated image")]

    with FeatureWriter(c, grid_meta()) as writer:
        writer.add("1", grid_record(grid_map(5), (101, 200), (600, 1000)))  # same id, other values
    with pytest.raises(MergeConflictError, match="'1'"):
        merge_stores(str(tmp_path / "ac.h5"), [a, c])
    assert not os.path.exists(tmp_path / "ac.h5")
    write_grid(tmp_path / "half.h5", [4], meta_kw={"dtype": "float16"})
    with pytest.raises(StoreMismatchError, match="dtype"):
        merge_stores(str(tmp_path / "x.h5"), [a, str(tmp_path / "half.h5")])
    with pytest.raises(StoreError, match="already exists"):
        merge_stores(str(tmp_path / "ab.h5"), [a, b])
    with pytest.raises(StoreError, match="also one of the shards"):
        merge_stores(a, [a, b], overwrite=True)


def test_merge_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    from gridfeats.cli import main

    a = str(tmp_path / "a.h5")
    write_grid(a, [0, 1])
    write_grid(tmp_path / "b.h5", [2])
    assert main(["merge", str(tmp_path / "m.h5"), a, str(tmp_path / "b.h5")]) == 0
    assert "3 images" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "n.h5"), a, str(tmp_path / "nope.h5")]) == 2
    assert "shard not found" in capsys.readouterr().err


def test_reader_is_picklable_and_reopens_after_fork(tmp_path):
    out = tmp_path / "p.h5"
    write_grid(out, range(3))
    store = FeatureStore(str(out))
    store[0]  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(store))
    assert clone._file is None
    np.testing.assert_array_equal(clone.grid(2), grid_map(2))


def test_reader_in_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "dl.h5"
    write_grid(out, range(10), commit_every=4)
    store = FeatureStore(str(out))
    store[0]  # the parent has an open handle before the workers fork

    class Maps(torch.utils.data.Dataset):
        def __len__(self):
            return len(store)

        def __getitem__(self, i):
            image_id = store.ids[i]
            return int(image_id), torch.from_numpy(store.grid(image_id)).sum(), os.getpid()

    loader = torch.utils.data.DataLoader(Maps(), batch_size=None, num_workers=2)
    seen = {}
    pids = set()
    for image_id, total, pid in loader:
        seen[int(image_id)] = float(total)
        pids.add(int(pid))
    assert pids and os.getpid() not in pids
    assert seen == pytest.approx({i: float(grid_map(i).sum()) for i in range(10)}, rel=1e-5)


def assert_same_content(a: FeatureStore, b: FeatureStore) -> None:
    """Same ids, same rows and index values per id, same errors (order may differ)."""
    assert a.meta.mismatches(b.meta) == []
    assert sorted(a.ids) == sorted(b.ids)
    for image_id in a.ids:
        left, right = a[image_id], b[image_id]
        assert left.keys() == right.keys()
        for key in left:
            np.testing.assert_array_equal(left[key], right[key], err_msg=f"{image_id}/{key}")
    assert sorted(a.errors) == sorted(b.errors)


def test_reader_refuses_to_mix_its_index_with_a_replaced_file(tmp_path):
    out = str(tmp_path / "r.h5")
    write_grid(out, [0, 1])
    store = FeatureStore(out)
    write_grid(out, [5], meta_kw={})  # extends the run: the file is replaced by a consolidated one
    assert len(FeatureStore(out)) == 3
    with pytest.raises(StoreError, match="was replaced"):
        store[0]


def test_merge_refuses_a_shard_with_an_unfinished_run(tmp_path):
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    write_grid(a, [0])
    write_grid(b, [1])
    writer = FeatureWriter(b, grid_meta())
    writer.add("2", grid_record(grid_map(2), (1, 1), (1, 1)))
    writer.abort()
    with pytest.raises(StoreError, match="unfinished run"):
        merge_stores(str(tmp_path / "m.h5"), [a, b])


def test_consolidate_mid_run_publishes_committed_images_and_readers_are_warned(tmp_path):
    out = str(tmp_path / "live.h5")
    writer = FeatureWriter(out, grid_meta(), commit_every=2)
    for i in range(5):
        writer.add(str(i), grid_record(grid_map(i), (100 + i, 200), (600, 1000)))
    writer.consolidate()  # 4 committed, 1 still buffered
    with pytest.warns(RuntimeWarning, match="unfinished"):
        live = FeatureStore(out)
    assert live.ids == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(live.grid("3"), grid_map(3))
    writer.close()
    assert FeatureStore(out).ids == [str(i) for i in range(5)]
