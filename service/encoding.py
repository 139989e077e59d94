"""Response bodies: JSON, ``.npy`` or ``.npz``, chosen from the ``Accept`` header.

JSON is for people and small answers; NumPy files carry the same arrays bit for bit and are many
times smaller and faster to produce, which matters for 2048-channel grids. Encoding runs in a worker
thread (the app's job), never on the event loop.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pydantic_core

from service.errors import NotAcceptable
from service.results import ImageResult
from service.schemas import JSON_MEDIA_TYPE, NPY_MEDIA_TYPE, NPZ_MEDIA_TYPE

SUPPORTED = (JSON_MEDIA_TYPE, NPY_MEDIA_TYPE, NPZ_MEDIA_TYPE)
_WILDCARDS = {"*/*": JSON_MEDIA_TYPE, "application/*": JSON_MEDIA_TYPE}


def _media_ranges(accept: str) -> List[Tuple[float, int, str]]:
    ranges = []
    for position, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        quality = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranges.append((quality, position, media))
    return ranges


def choose_media_type(accept: Optional[str]) -> str:
    """The response type for an ``Accept`` header: highest q first, then the order given.

    No header (or only wildcards) means JSON; a header naming nothing we produce is a 406.
    """
    if not accept or not accept.strip():
        return JSON_MEDIA_TYPE
    ranges = sorted(_media_ranges(accept), key=lambda r: (-r[0], r[1]))
    for quality, _, media in ranges:
        if quality <= 0:
            continue
        if media in SUPPORTED:
            return media
        if media in _WILDCARDS:
            return _WILDCARDS[media]
    raise NotAcceptable(f"cannot answer with {accept!r}; accepted types: {', '.join(SUPPORTED)}")


def encode_json(results: Sequence[ImageResult], header: Dict[str, Any]) -> bytes:
    """The :class:`~service.schemas.FeaturesResponse` document as UTF-8 JSON."""
    images = []
    for result in results:
        entry: Dict[str, Any] = {
            "index": result.index,
            "image_hw": list(result.image_hw),
            "input_hw": list(result.input_hw),
            "shape": list(result.arrays["features"].shape),
        }
        for name, array in result.arrays.items():
            entry[name] = array.tolist()
        entry.update(result.names)
        images.append(entry)
    document = dict(header)
    document["images"] = images
    # pydantic-core's serializer is ~8x faster than json.dumps on large nested float lists;
    # non-finite values never reach it (results.cast_features refuses them).
    return pydantic_core.to_json(document)


def encode_npy(results: Sequence[ImageResult]) -> bytes:
    """The features array of the single image of the request, as a ``.npy`` file."""
    if len(results) != 1:
        raise NotAcceptable(
            f"{NPY_MEDIA_TYPE} holds one array but the request has {len(results)} images; "
            f"use {NPZ_MEDIA_TYPE} or JSON"
        )
    buffer = io.BytesIO()
    np.save(buffer, results[0].arrays["features"], allow_pickle=False)
    return buffer.getvalue()


def npz_arrays(results: Sequence[ImageResult]) -> Dict[str, np.ndarray]:
    """Every array of every image, named ``'<index>/<field>'`` (sizes included as int32 arrays)."""
    arrays: Dict[str, np.ndarray] = {}
    for result in results:
        prefix = f"{result.index}/"
        arrays[prefix + "image_hw"] = np.asarray(result.image_hw, dtype=np.int32)
        arrays[prefix + "input_hw"] = np.asarray(result.input_hw, dtype=np.int32)
        for name, array in result.arrays.items():
            arrays[prefix + name] = array
    return arrays


def encode_npz(results: Sequence[ImageResult]) -> bytes:
    """All arrays of the request as an uncompressed ``.npz`` file (see :func:`npz_arrays`)."""
    buffer = io.BytesIO()
    np.savez(buffer, **npz_arrays(results))
    return buffer.getvalue()


def encode(media_type: str, results: Sequence[ImageResult], header: Dict[str, Any]) -> bytes:
    """Encode ``results`` as ``media_type`` (one of :data:`SUPPORTED`)."""
    if media_type == NPY_MEDIA_TYPE:
        return encode_npy(results)
    if media_type == NPZ_MEDIA_TYPE:
        return encode_npz(results)
    return encode_json(results, header)
