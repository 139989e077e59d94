"""The one image reader of the project: bytes or a path in, an RGB uint8 array out.

Decoding follows Detectron2's ``read_image`` (PIL decode, EXIF orientation, ``convert("RGB")``) so
that features match Detectron2 number for number, and adds what a batch job over 100k+ user images
needs: every failure becomes an :class:`ImageReadError` with a short, specific reason (empty file,
not an image, truncated, too many pixels, ...) instead of an arbitrary exception deep inside PIL,
and 16-bit / float images are scaled to 8 bits instead of being clipped.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gridfeats.errors import GridfeatsError

#: Default pixel limit (width * height) against decompression bombs; PIL's own default.
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = Union[
    str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray
]

_PIL_LIMIT_LOCK = threading.Lock()


class ImageReadError(GridfeatsError, ValueError):
    """An input that cannot be turned into an image. ``reason`` is short and specific."""

    def __init__(self, reason: str, source: Optional[str] = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


def _describe(source: ImageSource) -> Optional[str]:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return None


def _open(source: ImageSource, max_pixels: Optional[int]) -> Image.Image:
    """Open (header only) a path, bytes or file object; our bomb check replaces PIL's own."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageReadError("file not found" if not path.exists() else "not a regular file")
        if path.stat().st_size == 0:
            raise ImageReadError("empty file")
        fp: BinaryIO = open(path, "rb")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageReadError("empty file")
        fp = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        data = source.read()
        if not data:
            raise ImageReadError("empty file")
        fp = io.BytesIO(data)
    else:
        raise TypeError(f"unsupported image source type: {type(source).__name__}")
    try:
        # PIL refuses images above 2x its limit before we can give our own reason; lift its limit
        # (briefly, under a lock) and enforce ours on the header size instead.
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        fp.close()
        raise ImageReadError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        fp.close()
        raise ImageReadError(f"corrupt image header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise ImageReadError(f"invalid image size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageReadError(f"too many pixels: {w * h} > {max_pixels}")
    return img


def _decode(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except OSError as e:
        msg = str(e)
        if "truncated" in msg:
            raise ImageReadError("truncated image") from None
        raise ImageReadError(f"corrupt image data: {msg}") from None
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"corrupt image data: {e}") from None
    return img


def _exif_transpose(img: Image.Image) -> Image.Image:
    # Detectron2 applies ImageOps.exif_transpose and keeps the unrotated image if that fails.
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        return img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        # High bit depth grayscale: convert("RGB") would clip to 255; scale to 8 bits instead.
        arr = np.asarray(img)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
            gray = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode != "RGB":
        img = img.convert("RGB")  # L, P, CMYK, RGBA (alpha dropped, as Detectron2 does), YCbCr, ...
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(f"array must be HxWx3 RGB (or HxW gray), got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ImageReadError(f"array must be uint8, got {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"invalid image size {arr.shape[1]}x{arr.shape[0]}")
    return np.ascontiguousarray(arr)


def read_image(source: ImageSource, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` into an ``HxWx3`` uint8 RGB array, EXIF orientation applied.

    ``source`` is a path, encoded bytes, a binary file object, a PIL image or an RGB uint8 array.
    ``max_pixels`` guards against decompression bombs (``None`` disables the guard).
    Raises :class:`ImageReadError` with a specific ``reason`` for anything that is not a usable
    image.
    """
    name = _describe(source)
    try:
        if isinstance(source, np.ndarray):
            return _from_array(source)
        if isinstance(source, Image.Image):
            w, h = source.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageReadError(f"too many pixels: {w * h} > {max_pixels}")
            return _to_rgb_array(_exif_transpose(_decode(source)))
        img = _open(source, max_pixels)
        try:
            img = _decode(img)
            fmt = img.format
            out = _to_rgb_array(_exif_transpose(img))
        finally:
            img.close()
        if out.size == 0:
            raise ImageReadError(f"empty {fmt or 'image'}")
        return out
    except ImageReadError as e:
        if e.source is None and name is not None:
            raise ImageReadError(e.reason, name) from None
        raise
