"""The image reader (docs/detectron2-facts.md 2.1): colour modes, formats, EXIF orientation,
sizes, and a specific ImageReadError reason for every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from gridfeats.data.image_io import ImageReadError, read_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reason(source, **kwargs) -> str:
    with pytest.raises(ImageReadError) as err:
        read_image(source, **kwargs)
    return err.value.reason


# --------------------------------------------------------------------------------------------------
# Colour modes
# --------------------------------------------------------------------------------------------------
def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.array(
        [[[10, 20, 30, 0], [200, 100, 50, 255]], [[1, 2, 3, 128], [255, 255, 255, 0]]], np.uint8
    )
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3])


def test_cmyk_tiff(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tiff")
    out = read_image(tmp_path / "c.tiff")
    # white, cyan, red, black
    assert out.tolist() == [[[255, 255, 255], [0, 255, 255]], [[255, 0, 0], [0, 0, 0]]]


def test_palette_png(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([9, 8, 7, 200, 0, 100, 0, 50, 250] + [0] * (256 * 3 - 9))
    img.putdata([2, 0, 1])
    img.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").tolist() == [[[0, 50, 250], [9, 8, 7], [200, 0, 100]]]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png")
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    expected = values[0].astype(np.float64) * 255 / 65535  # 0, 1, 3.9, 127.5, 255
    assert np.all(np.abs(out[0, :, 0].astype(np.float64) - expected) <= 1.0)
    assert out[0, 2, 0] < 10  # convert("RGB") would clip 1000 to 255
    assert np.all(out[0, :, 0] == out[0, :, 1]) and np.all(out[0, :, 1] == out[0, :, 2])


# --------------------------------------------------------------------------------------------------
# Formats and sizes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "suffix,kwargs", [(".bmp", {}), (".tiff", {}), (".png", {}), (".webp", {"lossless": True})]
)
def test_lossless_formats_round_trip(tmp_path, suffix, kwargs):
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    rgb = _rgb(5, 7)
    Image.fromarray(rgb).save(tmp_path / f"x{suffix}", **kwargs)
    np.testing.assert_array_equal(read_image(tmp_path / f"x{suffix}"), rgb)


@pytest.mark.parametrize("h,w", [(1, 1), (20, 5000), (5000, 3)])
def test_extreme_sizes(tmp_path, h, w):
    rgb = _rgb(h, w, seed=1)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), rgb)


def _quadrants(h: int = 40, w: int = 60) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = RED
    img[: h // 2, w // 2 :] = GREEN
    img[h // 2 :, : w // 2] = BLUE
    img[h // 2 :, w // 2 :] = WHITE
    return img


def _colour_at(img: np.ndarray, fy: float, fx: float):
    pixel = img[int(fy * img.shape[0]), int(fx * img.shape[1])].astype(int)
    for name, colour in (("red", RED), ("green", GREEN), ("blue", BLUE), ("white", WHITE)):
        if np.abs(pixel - np.array(colour)).max() < 40:  # JPEG tolerance
            return name
    return tuple(pixel)


@pytest.mark.parametrize(
    "orientation,corners,rot90_k",
    [
        # 6: the stored image must be turned 90 degrees clockwise for display.
        (6, {"tl": "blue", "tr": "red", "bl": "white", "br": "green"}, -1),
        # 8: 90 degrees counter-clockwise.
        (8, {"tl": "green", "tr": "white", "bl": "red", "br": "blue"}, 1),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, corners, rot90_k):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(_quadrants()).save(path, quality=95, exif=exif.tobytes())
    out = read_image(path)
    assert out.shape == (60, 40, 3)  # (h, w) of the stored 40 x 60 image, swapped
    found = {
        "tl": _colour_at(out, 0.25, 0.25),
        "tr": _colour_at(out, 0.25, 0.75),
        "bl": _colour_at(out, 0.75, 0.25),
        "br": _colour_at(out, 0.75, 0.75),
    }
    assert found == corners
    with Image.open(
        path
    ) as raw:  # same decoder, no rotation: the output is exactly a rotation of it
        stored = np.asarray(raw.convert("RGB"))
    np.testing.assert_array_equal(out, np.rot90(stored, k=rot90_k))


# --------------------------------------------------------------------------------------------------
# Input kinds
# --------------------------------------------------------------------------------------------------
def test_bytes_file_object_pil_and_array_equal_path_input(tmp_path):
    rgb = _rgb(9, 13, seed=2)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    data = path.read_bytes()
    expected = read_image(path)
    np.testing.assert_array_equal(expected, rgb)
    np.testing.assert_array_equal(read_image(str(path)), expected)
    np.testing.assert_array_equal(read_image(data), expected)
    np.testing.assert_array_equal(read_image(bytearray(data)), expected)
    np.testing.assert_array_equal(read_image(io.BytesIO(data)), expected)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(read_image(f), expected)
    with Image.open(path) as pil:
        np.testing.assert_array_equal(read_image(pil), expected)
    np.testing.assert_array_equal(read_image(rgb), expected)
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(read_image(gray), np.repeat(gray[:, :, None], 3, axis=2))


def test_bad_arrays_are_refused_with_a_reason():
    assert _reason(np.zeros((4, 4, 4), np.uint8)).startswith("array must be HxWx3")
    assert _reason(np.zeros((4, 4, 3), np.float32)) == "array must be uint8, got float32"
    assert _reason(np.zeros((0, 4, 3), np.uint8)).startswith("invalid image size")


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------
def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64, seed=3)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / "cut.jpg")
    assert err.value.reason == "truncated image"
    assert str(tmp_path / "cut.jpg") in str(err.value)  # the message names the file
    assert isinstance(err.value, ValueError)
    assert _reason(data[: len(data) // 2]) == "truncated image"


def test_empty_missing_and_non_image_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(tmp_path / "empty.jpg") == "empty file"
    assert _reason(b"") == "empty file"
    assert _reason(io.BytesIO(b"")) == "empty file"
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    assert _reason(tmp_path / "notes.jpg").startswith("not an image")
    assert _reason(tmp_path / "missing.png") == "file not found"
    assert _reason(tmp_path) == "not a regular file"


def test_decompression_bomb_guard(tmp_path):
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "big.png")
    assert _reason(tmp_path / "big.png", max_pixels=100) == "too many pixels: 600 > 100"
    with Image.open(tmp_path / "big.png") as pil:
        assert _reason(pil, max_pixels=599) == "too many pixels: 600 > 599"
    assert read_image(tmp_path / "big.png", max_pixels=600).shape == (20, 30, 3)
    assert read_image(tmp_path / "big.png", max_pixels=None).shape == (20, 30, 3)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR chunk is rewritten to claim ``width x height`` (CRC fixed up)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # Signature (8) + length (4) + b"IHDR" (4), then width and height (big-endian), then the CRC.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_header_larger_than_pils_own_limit_gets_our_reason():
    """PIL raises its own DecompressionBombError above 2x its limit; the reader reports its reason
    from the header alone, before decoding anything."""
    assert _reason(_png_header_claiming(20000, 10000)) == "too many pixels: 200000000 > 89478485"
