"""A folder mixing good images of every awkward kind with every kind of bad input.

The run must finish: each bad file in ``errors/`` with its specific reason, each good one in
``index/`` with its true (EXIF-oriented) size, the exit code 1 and the summary counting failures.
It runs through the real command line with 2 DataLoader workers, so failures cross the worker
boundary as records.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from gridfeats.cli import main as gridfeats_main
from gridfeats.store import FeatureStore
from tests.extract.helpers import (
    SMALL,
)

MAX_PIXELS = 200_000

pytestmark = pytest.mark.usefixtures("one_thread")


def pattern(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_inputs(folder: str):
    """Write the files; returns ({good id: expected (h, w)}, {bad id: expected reason fragment})."""
    rgb = Image.fromarray(pattern(60, 90))
    good, bad = {}, {}

    def put(name: str, data: bytes) -> None:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)

    put("good/rgb.jpg", jpeg_bytes(rgb))
    good["good/rgb.jpg"] = (60, 90)
    put("good/gray.png", png_bytes(rgb.convert("L")))
    good["good/gray.png"] = (60, 90)
    put("good/rgba.png", png_bytes(rgb.convert("RGBA")))
    good["good/rgba.png"] = (60, 90)
    put("good/cmyk.jpg", jpeg_bytes(rgb.convert("CMYK")))
    good["good/cmyk.jpg"] = (60, 90)
    put("good/palette.png", png_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE)))
    good["good/palette.png"] = (60, 90)
    sixteen = Image.frombytes(
        "I;16", (90, 60), (pattern(60, 90)[..., 0].astype("<u2") * 257).tobytes()
    )
    put("good/sixteen.png", png_bytes(sixteen))
    good["good/sixteen.png"] = (60, 90)
    for fmt, ext in (("BMP", "bmp"), ("TIFF", "tiff"), ("WEBP", "webp")):
        buf = io.BytesIO()
        rgb.save(buf, format=fmt)
        put(f"good/photo.{ext}", buf.getvalue())
        good[f"good/photo.{ext}"] = (60, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 90x60 (w x h) shows as 60 wide, 90 tall
    put("good/exif.jpg", jpeg_bytes(rgb, exif=exif.tobytes()))
    good["good/exif.jpg"] = (90, 60)
    put("good/tiny.png", png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))))
    good["good/tiny.png"] = (1, 1)
    put("good/wide.png", png_bytes(Image.fromarray(pattern(12, 1500))))
    good["good/wide.png"] = (12, 1500)

    full = jpeg_bytes(Image.fromarray(pattern(120, 160)))
    put("bad/truncated.jpg", full[: len(full) // 2])
    bad["bad/truncated.jpg"] = "truncated"
    png = bytearray(png_bytes(Image.fromarray(pattern(40, 40))))
    start = png.index(b"IDAT") + 8
    png[start : start + 40] = b"\x00" * 40
    put("bad/corrupt.png", bytes(png))
    bad["bad/corrupt.png"] = "corrupt"
    put("bad/empty.jpg", b"")
    bad["bad/empty.jpg"] = "empty file"
    put("bad/text.jpg", b"this is a text file, not a picture\n" * 3)
    bad["bad/text.jpg"] = "not an image"
    put("bad/huge.png", png_bytes(Image.new("RGB", (600, 500))))
    bad["bad/huge.png"] = f"too many pixels: 300000 > {MAX_PIXELS}"
    return good, bad


def test_bad_inputs_are_recorded_and_good_ones_stored(tmp_path, capsys):
    folder = str(tmp_path / "mixed")
    good, bad = make_inputs(folder)
    out = str(tmp_path / "mixed.h5")
    args = [
        "extract",
        "--config",
        "R-50-grid",
        "--input",
        folder,
        "--output",
        out,
        "--workers",
        "2",
        "--batch-size",
        "4",
        "--max-pixels",
        str(MAX_PIXELS),
        "--no-progress",
        *SMALL,
    ]
    code = gridfeats_main(args)
    printed = capsys.readouterr().out
    assert code == 1
    assert f"{len(good)} stored, {len(bad)} failed" in printed
    store = FeatureStore(out)
    reasons = dict(store.errors)
    assert sorted(reasons) == sorted(bad)
    for image_id, fragment in bad.items():
        assert fragment in reasons[image_id], (image_id, reasons[image_id])
        assert image_id in printed
    assert sorted(store.ids) == sorted(good)
    for image_id, hw in good.items():
        item = store[image_id]
        assert tuple(item["image_hw"]) == hw, image_id
        assert item["features"].shape[0] == int(np.prod(item["grid_hw"])) > 0
        assert np.isfinite(item["features"]).all()
    # The same command again: nothing to do, same answer.
    assert gridfeats_main(args) == 1
    assert f"0 processed (0 failed), {len(good) + len(bad)} already done" in capsys.readouterr().out


@pytest.mark.parametrize("reason_fragment, data", [("truncated", "truncated"), ("empty file", b"")])
def test_single_bad_file_does_not_stop_a_run(tmp_path, capsys, reason_fragment, data):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(pattern(50, 70)).save(folder / "a.png")
    full = jpeg_bytes(Image.fromarray(pattern(80, 80)))
    (folder / "b.jpg").write_bytes(full[: len(full) // 3] if data == "truncated" else data)
    Image.fromarray(pattern(70, 50)).save(folder / "c.png")
    out = str(tmp_path / "o.h5")
    code = gridfeats_main(
        [
            "extract",
            "--config",
            "R-50-grid",
            "--input",
            str(folder),
            "--output",
            out,
            "--workers",
            "0",
            "--no-progress",
            *SMALL,
        ]
    )
    assert code == 1
    store = FeatureStore(out)
    assert store.ids == ["a.png", "c.png"]
    assert reason_fragment in dict(store.errors)["b.jpg"]
