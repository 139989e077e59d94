"""The decoding side of the job: failures as records, input order with workers, inherited locks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from gridfeats.extract.loader import (
    FailedImage,
    InputSpec,
    LoadedImage,
    _close_descriptors_of,
    load_image,
    make_loader,
)
from gridfeats.extract.sources import ImageItem

SPEC = InputSpec(min_size=32, max_size=48)


def write_png(path, h, w):
    Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(path)
    return str(path)


def test_load_image_turns_failures_into_records(tmp_path):
    good = load_image(ImageItem("a", write_png(tmp_path / "a.png", 20, 40)), SPEC)
    assert (
        isinstance(good, LoadedImage)
        and good.prepared.orig_hw == (20, 40)
        and good.prepared.input_hw == (24, 48)
    )
    (tmp_path / "b.jpg").write_bytes(b"")
    empty = load_image(ImageItem("b", str(tmp_path / "b.jpg")), SPEC)
    assert empty == FailedImage("b", "empty file")
    missing = load_image(ImageItem("c", str(tmp_path / "c.jpg")), SPEC)
    assert missing == FailedImage("c", "file not found")
    big = load_image(ImageItem("a", str(tmp_path / "a.png")), InputSpec(32, 48, max_pixels=100))
    assert big == FailedImage("a", "too many pixels: 800 > 100")


def test_loader_keeps_input_order_with_workers(tmp_path):
    items = []
    for k in range(7):
        if k == 3:
            (tmp_path / "3.png").write_bytes(b"not a png")
            items.append(ImageItem("3", str(tmp_path / "3.png")))
        else:
            items.append(ImageItem(str(k), write_png(tmp_path / f"{k}.png", 10 + k, 30)))
    for workers in (0, 2):
        batches = list(make_loader(items, SPEC, batch_size=2, workers=workers))
        assert [len(b) for b in batches] == [2, 2, 2, 1]
        flat = [x for b in batches for x in b]
        assert [x.image_id for x in flat] == [str(k) for k in range(7)]
        assert isinstance(flat[3], FailedImage) and "not an image" in flat[3].reason
        assert [x.prepared.orig_hw for x in flat if isinstance(x, LoadedImage)] == [
            (10 + k, 30) for k in range(7) if k != 3
        ]
    with pytest.raises(ValueError, match="batch size"):
        make_loader(items, SPEC, batch_size=0)


def test_worker_closes_inherited_descriptors_of_a_file(tmp_path):
    path = tmp_path / "lock"
    path.write_text("")
    fd = os.open(path, os.O_RDWR)
    other = os.open(__file__, os.O_RDONLY)
    try:
        _close_descriptors_of(str(path))
        with pytest.raises(OSError):
            os.fstat(fd)
        os.fstat(other)  # unrelated descriptors stay open
    finally:
        os.close(other)
