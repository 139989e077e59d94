"""``gridfeats demo`` end to end at a tiny input size: data, both feature stores, PNG, text."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from gridfeats.cli import main as gridfeats_main
from gridfeats.data.image_io import read_image
from gridfeats.demo import _COLOURS, draw_regions
from gridfeats.store import FeatureStore
from tests.extract.helpers import (
    SMALL,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_the_main_job_and_draws_regions(tmp_path, capsys):
    out = str(tmp_path / "demo")
    code = gridfeats_main(["demo", "--out", out, "--num-images", "2", "--workers", "0", *SMALL])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "seeded random initialisation" in printed.out
    assert "shortest edge 64, longest at most 96" in printed.out
    grid, region = (
        FeatureStore(os.path.join(out, "grid.h5")),
        FeatureStore(os.path.join(out, "region.h5")),
    )
    assert grid.mode == "grid" and sorted(grid.ids) == ["1", "2"]
    assert region.mode == "region" and sorted(region.ids) == ["1", "2"]
    assert all(region.count(i) >= 10 for i in region)  # bottom-up keeps at least 10 boxes
    source = read_image(os.path.join(out, "data", "images", "000001.jpg"))
    drawn = np.asarray(Image.open(os.path.join(out, "detections.png")).convert("RGB"))
    assert drawn.shape == source.shape
    first_colour = np.all(drawn == np.array(_COLOURS[0], dtype=np.uint8), axis=-1)
    assert first_colour.sum() > 20 and not np.all(source == np.array(_COLOURS[0]), axis=-1).any()
    # Running it again replaces everything cleanly.
    assert (
        gridfeats_main(["demo", "--out", out, "--num-images", "2", "--workers", "0", *SMALL]) == 0
    )


def test_draw_regions_outlines_each_box_in_its_colour():
    image = np.full((60, 80, 3), 128, dtype=np.uint8)
    canvas = np.asarray(
        draw_regions(
            image, np.array([[10.0, 30.0, 50.0, 55.0], [5, 5, 20, 20]]), ["a 0.9", "b 0.5"]
        )
    )
    assert tuple(canvas[55, 30]) == _COLOURS[0]  # bottom edge of box 0
    assert tuple(canvas[12, 20]) == _COLOURS[1]  # right edge of box 1
    assert tuple(canvas[45, 30]) == (128, 128, 128)  # inside box 0, below its label: untouched


def test_demo_refuses_bad_arguments(tmp_path, capsys):
    assert gridfeats_main(["demo", "--out", str(tmp_path), "--num-images", "0"]) == 2
    assert "--num-images" in capsys.readouterr().err
