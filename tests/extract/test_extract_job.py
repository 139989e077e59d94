"""The extraction run in-process: content, determinism, resume rules, strict mode, CLI behaviour."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from gridfeats.api import Detector
from gridfeats.cli import main as gridfeats_main
from gridfeats.config import get_cfg
from gridfeats.engine.distributed import RankInfo
from gridfeats.extract.job import ExtractOptions, StrictStop, build_detector, run_extraction
from gridfeats.features import BottomUpSettings, storage_problem
from gridfeats.store import FeatureStore, merge_stores
from gridfeats.store.errors import StoreMismatchError
from tests.extract.helpers import (
    D2_RANDOM,
    SMALL,
    assert_same_content,
    make_images,
    read_all,
)

NUM_IMAGES = 8
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp("synthetic")), NUM_IMAGES)


@pytest.fixture
def three_images(images, tmp_path):
    """A folder holding the first three images (hard links): for tests that run several times."""
    folder = tmp_path / "three"
    folder.mkdir()
    for name in sorted(os.listdir(images))[:3]:
        os.link(os.path.join(images, name), folder / name)
    return str(folder)


def options(images, output, **overrides) -> ExtractOptions:
    base = dict(
        input=images,
        output=str(output),
        config="R-50-grid",
        opts=list(SMALL),
        workers=0,
        dtype="float32",
        progress=False,
    )
    base.update(overrides)
    return ExtractOptions(**base)


def test_grid_rows_are_the_detectors_grids(images, tmp_path):
    opts = options(images, tmp_path / "grid.h5")
    summary = run_extraction(opts)
    assert (summary.images, summary.errors, summary.run.processed) == (NUM_IMAGES, 0, NUM_IMAGES)
    store = FeatureStore(opts.output)
    assert store.mode == "grid" and store.feature_dim == 2048 and len(store) == NUM_IMAGES
    assert summary.rows == sum(store.count(i) for i in store)
    detector = build_detector(opts, RankInfo())
    for image_id in store.ids[:3]:
        expected = detector.extract_grid(os.path.join(images, image_id)).numpy()
        assert np.array_equal(store.grid(image_id), expected)
        item = store[image_id]
        assert tuple(item["grid_hw"]) == expected.shape[1:]
        assert max(item["input_hw"]) <= 96 and min(item["input_hw"]) <= 64
    config = store.attrs["config"]
    assert (
        "MIN_SIZE_TEST: 64" in config
        and "#   mode: grid" in config
        and "fast_kernels: true" in config
    )


def test_grid_pooling_gives_fixed_size_maps(images, tmp_path):
    opts = options(images, tmp_path / "pooled.h5", grid_pool=(2, 2), dtype="float16")
    run_extraction(opts)
    store = FeatureStore(opts.output)
    for image_id in store:
        item = store[image_id]
        assert tuple(item["grid_hw"]) == (2, 2) and item["features"].shape == (4, 2048)
        assert item["features"].dtype == np.float16


def test_detectron2_regions_are_detect_outputs(images, tmp_path):
    opts = options(images, tmp_path / "d2.h5", mode="region", opts=SMALL + D2_RANDOM, attr_topk=5)
    run_extraction(opts)
    store = FeatureStore(opts.output)
    assert store.meta.attr_topk == 5 and store.feature_dim == 1024
    detector = build_detector(opts, RankInfo())
    image_id = store.ids[0]
    expected = detector.detect(os.path.join(images, image_id))
    item = store[image_id]
    assert len(item["boxes"]) == 8
    assert np.array_equal(item["boxes"], expected["boxes"].numpy())
    assert np.array_equal(item["scores"], expected["scores"].numpy())
    assert np.array_equal(item["classes"], expected["classes"].numpy().astype(np.int32))
    assert np.array_equal(item["features"], expected["features"].numpy())
    top = torch.topk(expected["attr_scores"], 5, dim=1)
    assert np.array_equal(item["attr_ids"], top.indices.numpy().astype(np.int32))
    h, w = item["image_hw"]
    assert (item["boxes"][:, 0::2] <= w).all() and (item["boxes"][:, 1::2] <= h).all()


@pytest.mark.parametrize("mode", ["grid", "region"])
def test_results_do_not_depend_on_batch_size_workers_or_shards(images, tmp_path, mode):
    """Grid and bottom-up region rows are bit-identical alone, in batches of 8 with 2 workers,
    and in 2 shards merged (the store's determinism guarantee)."""
    folder, count = images, NUM_IMAGES
    extra = {}
    if mode == "region":  # the costlier mode on half the images (a batch of 8 still holds them all)
        folder, count = str(tmp_path / "four"), NUM_IMAGES // 2
        os.mkdir(folder)
        for name in sorted(os.listdir(images))[:count]:
            os.link(os.path.join(images, name), os.path.join(folder, name))
        extra = {"regions": "bottom-up", "bottom_up": BottomUpSettings(min_boxes=4)}
    alone = options(folder, tmp_path / "alone.h5", mode=mode, batch_size=1, **extra)
    run_extraction(alone)
    batched = options(folder, tmp_path / "b8w2.h5", mode=mode, batch_size=8, workers=2, **extra)
    run_extraction(batched)
    shard_files = []
    for index in range(2):
        shard = options(
            folder,
            tmp_path / "sharded.h5",
            mode=mode,
            batch_size=8,
            shard_index=index,
            shard_count=2,
            **extra,
        )
        summary = run_extraction(shard)
        assert summary.images == count // 2
        assert "gridfeats merge" in summary.format()
        shard_files.append(summary.output)
    assert [os.path.basename(p) for p in shard_files] == [
        "sharded.shard-0-of-2.h5",
        "sharded.shard-1-of-2.h5",
    ]
    merged = str(tmp_path / "merged.h5")
    merge_stores(merged, shard_files)
    reference = read_all(alone.output)
    assert len(reference) == count + 1
    assert_same_content(reference, read_all(batched.output))
    assert_same_content(reference, read_all(merged))
    assert FeatureStore(batched.output).ids == FeatureStore(alone.output).ids  # input order kept
    if mode == "region":  # random weights: nothing passes 0.2, so exactly min_boxes per image
        assert all(FeatureStore(alone.output).count(i) == 4 for i in FeatureStore(alone.output))


def test_resume_skips_done_images_and_refuses_other_settings(three_images, tmp_path):
    opts = options(three_images, tmp_path / "grid.h5")
    first = run_extraction(opts)
    again = run_extraction(opts)
    assert again.run.skipped == 3 and again.run.processed == 0
    assert again.images == first.images
    changed = dataclasses.replace(opts, opts=SMALL[:1] + ["80"] + SMALL[2:])
    with pytest.raises(StoreMismatchError, match="config"):
        run_extraction(changed)
    exact = dataclasses.replace(opts, fast_kernels=False)
    with pytest.raises(StoreMismatchError):
        run_extraction(exact)
    fast_rows = read_all(opts.output)
    fresh = run_extraction(dataclasses.replace(exact, overwrite=True))
    assert fresh.run.processed == 3 and fresh.images == 3
    # --exact-kernels gives the plain Detector's numbers; folded norms agree to float rounding.
    plain = Detector(get_cfg("R-50-grid", SMALL))
    store = FeatureStore(exact.output)
    image_id = store.ids[0]
    assert np.array_equal(
        store.grid(image_id), plain.extract_grid(os.path.join(three_images, image_id)).numpy()
    )
    folded = fast_rows[image_id]["features"]
    np.testing.assert_allclose(folded, store[image_id]["features"], rtol=1e-3, atol=1e-4)


def test_strict_stops_at_the_first_failure_without_recording_it(three_images, tmp_path):
    with open(os.path.join(three_images, "000002b.jpg"), "wb") as fh:
        fh.write(b"definitely not a jpeg")
    opts = options(three_images, tmp_path / "strict.h5", strict=True, commit_every=1)
    with pytest.raises(StrictStop, match="000002b.jpg: not an image"):
        run_extraction(opts)
    with pytest.raises(StrictStop):  # the failure was not recorded: a re-run stops there again
        run_extraction(opts)
    relaxed = run_extraction(dataclasses.replace(opts, strict=False))
    assert relaxed.errors == 1 and relaxed.images == 3
    assert relaxed.run.skipped == 2  # the two images before the bad one were committed


def test_cli_usage_errors_exit_2_with_a_message(images, tmp_path, capsys):
    out = str(tmp_path / "x.h5")
    code = gridfeats_main(
        ["extract", "--config", "R-50-grid", "--input", str(tmp_path / "nope"), "--output", out]
    )
    assert code == 2 and "input not found" in capsys.readouterr().err
    code = gridfeats_main(
        ["extract", "--config", "no-such-config", "--input", images, "--output", out]
    )
    assert code == 2 and "neither a file nor a shipped config" in capsys.readouterr().err
    code = gridfeats_main(
        [
            "extract",
            "--config",
            "R-50-grid",
            "--input",
            images,
            "--output",
            out,
            "INPUT.NO_SUCH_KEY",
            "1",
        ]
    )
    assert code == 2 and "NO_SUCH_KEY" in capsys.readouterr().err
    code = gridfeats_main(
        [
            "extract",
            "--config",
            "R-50-grid",
            "--input",
            images,
            "--output",
            out,
            "INPUT.MIN_SIZE_TEST",
        ]
    )
    assert code == 2 and "KEY VALUE pairs" in capsys.readouterr().err
    code = gridfeats_main(
        [
            "extract",
            "--config",
            "R-50-grid",
            "--input",
            images,
            "--output",
            out,
            "--precision",
            "fp16",
        ]
    )
    assert code == 2 and "fp16 is a GPU mode" in capsys.readouterr().err
    code = gridfeats_main(
        [
            "extract",
            "--config",
            "R-50-grid",
            "--input",
            images,
            "--output",
            out,
            "--min-boxes",
            "20",
            "--max-boxes",
            "5",
        ]
    )
    assert code == 2 and "min boxes <= max boxes" in capsys.readouterr().err
    code = gridfeats_main(
        [
            "extract",
            "--config",
            "R-50-grid",
            "--input",
            images,
            "--output",
            out,
            "--mode",
            "region",
            "--grid-pool",
            "7x7",
        ]
    )
    assert code == 2 and "grid pooling only applies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gridfeats_main(
            [
                "extract",
                "--config",
                "R-50-grid",
                "--input",
                images,
                "--output",
                out,
                "--shard",
                "2/2",
            ]
        )
    assert "need 0 <= i < n" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_storage_problems_are_caught_before_the_writer():
    ok = {"features": np.ones((3, 4), dtype=np.float32)}
    assert storage_problem(ok, "float16") is None
    big = {"features": np.full((3, 4), 1e5, dtype=np.float32)}
    assert "overflow float16" in storage_problem(big, "float16")
    assert storage_problem(big, "float32") is None
    nan = {"features": np.array([[np.nan]], dtype=np.float32)}
    assert "non-finite" in storage_problem(nan, "float32")


def _make_layout_1(path: str) -> None:
    """What gridfeats 0.1.0 wrote: the same file without the feature_layout attribute."""
    import h5py

    with h5py.File(path, "r+") as f:
        del f.attrs["feature_layout"]


def test_a_region_store_of_the_old_layout_warns_and_is_not_resumed(three_images, tmp_path):
    from gridfeats.store.errors import StaleFeatureLayoutWarning

    opts = options(three_images, tmp_path / "d2.h5", mode="region", opts=SMALL + D2_RANDOM)
    run_extraction(opts)
    assert FeatureStore(opts.output).meta.feature_layout == 2
    _make_layout_1(opts.output)
    with pytest.warns(StaleFeatureLayoutWarning, match="misaligned"):
        store = FeatureStore(opts.output)
    assert store.meta.feature_layout == 1 and len(store) == 3  # still readable
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        run_extraction(opts)
    fresh = run_extraction(dataclasses.replace(opts, overwrite=True))
    assert fresh.run.processed == 3 and FeatureStore(opts.output).meta.feature_layout == 2


def test_a_grid_store_of_the_old_layout_resumes_without_warning(three_images, tmp_path):
    import warnings

    opts = options(three_images, tmp_path / "grid.h5")
    run_extraction(opts)
    _make_layout_1(opts.output)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureStore(opts.output)  # grid rows did not change between layouts
    assert run_extraction(opts).run.skipped == 3


def test_region_mode_refuses_backbone_only_weights_before_the_run(three_images, tmp_path):
    """A backbone-only checkpoint (what convert-backbone writes) makes grids; region extraction
    stops at start-up with the reason instead of failing mid-run."""
    from gridfeats.extract.job import ExtractError
    from gridfeats.modeling import build_model

    model = build_model(get_cfg("R-50-grid", SMALL))
    weights = tmp_path / "backbone.pth"
    state = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": state}, weights)
    grid = options(three_images, tmp_path / "grid.h5", weights=str(weights))
    assert run_extraction(grid).images == 3
    region = options(three_images, tmp_path / "region.h5", mode="region", weights=str(weights))
    with pytest.raises(ExtractError, match="weights"):
        run_extraction(region)
    assert not os.path.exists(region.output)
