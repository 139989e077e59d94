"""Where the images of an extraction job come from, and the stable id each one is stored under.

Three kinds of ``--input`` are accepted, so users never write a script to list their images:

* a **folder**: every file with an image extension below it (recursively, hidden entries skipped);
  the id is the path relative to the folder, with ``/`` separators (``train/cat_01.jpg``);
* a **COCO-format json** (``images[{id, file_name}]``, as COCO, Visual Genome and the synthetic
  set write it): the id is the COCO id as decimal text, files are read from ``--image-root``
  (default: the json's folder);
* a **text file** of paths, one per line (blank lines and ``#`` comments skipped): relative
  paths are resolved against ``--image-root`` (default: the list's folder), and the id is the
  path relative to that root.

Ids must be stable across runs because resuming and merging match images by id; the listing is
therefore sorted (folders) or kept in file order (json, list), never in directory-walk order.
Sharding takes every n-th image of that order (:func:`shard_items`), so shards are balanced and
the same image always lands in the same shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

from gridfeats.errors import GridfeatsError

#: File extensions treated as images when walking a folder (content is checked when decoding).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".dib",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)


class SourceError(GridfeatsError, ValueError):
    """The ``--input`` cannot be turned into a list of images (the message says why)."""


@dataclass(frozen=True)
class ImageItem:
    """One input image: the id it is stored under and the file to read."""

    image_id: str
    path: str


def list_images(source: str, image_root: Optional[str] = None) -> List[ImageItem]:
    """The images of a folder, a COCO json or a text file of paths (see the module docstring)."""
    source = os.path.expanduser(os.fspath(source))
    if image_root is not None:
        image_root = os.path.expanduser(os.fspath(image_root))
        if not os.path.isdir(image_root):
            raise SourceError(f"--image-root {image_root} is not a folder")
    if os.path.isdir(source):
        if image_root is not None:
            raise SourceError(
                "--image-root only applies to a COCO json or a list file, not to a folder input"
            )
        items = _folder_items(source)
    elif not os.path.exists(source):
        raise SourceError(f"input not found: {source}")
    elif source.lower().endswith(".json"):
        items = _coco_items(source, image_root)
    elif os.path.splitext(source)[1].lower() in IMAGE_EXTENSIONS:
        raise SourceError(
            f"{source} is an image file; pass its folder, a COCO json or a text file listing images"
        )
    else:
        items = _list_file_items(source, image_root)
    if not items:
        raise SourceError(f"no images found in {source}")
    return items


def shard_items(items: Sequence[ImageItem], index: int, count: int) -> List[ImageItem]:
    """Shard ``index`` of ``count``: every ``count``-th image, starting at ``index``."""
    if count < 1 or not 0 <= index < count:
        raise SourceError(f"shard {index}/{count} is invalid: need 0 <= i < n")
    return list(items[index::count])


# --- folders ------------------------------------------------------------------------------------
def _folder_items(root: str) -> List[ImageItem]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            found.append(ImageItem(_relative_id(path, root), path))
    found.sort(key=lambda item: item.image_id)
    return found


def _relative_id(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators, always valid UTF-8 (the store's id
    type): a file name that is not UTF-8 on disk keeps its odd bytes as ``\\xNN`` escapes."""
    relative = os.path.relpath(path, root).replace(os.sep, "/")
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        relative = os.fsencode(relative).decode("utf-8", "backslashreplace")
    return relative


# --- COCO json ----------------------------------------------------------------------------------
def _coco_items(json_path: str, image_root: Optional[str]) -> List[ImageItem]:
    try:
        with open(json_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{json_path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(
            f"{json_path} is not a COCO-format file: it needs a top-level 'images' list"
        )
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(json_path))
    items = [_coco_item(entry, k, root, json_path) for k, entry in enumerate(data["images"])]
    _check_unique(items, json_path, "images")
    _check_root_holds_images(items, root, json_path)
    return items


def _coco_item(entry: Any, k: int, root: str, json_path: str) -> ImageItem:
    if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
        raise SourceError(f"{json_path}: images[{k}] needs 'id' and 'file_name'")
    image_id, file_name = entry["id"], entry["file_name"]
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or str(image_id) == "":
        raise SourceError(f"{json_path}: images[{k}] has an invalid id {image_id!r}")
    if not isinstance(file_name, str) or not file_name:
        raise SourceError(f"{json_path}: images[{k}] has an invalid file_name {file_name!r}")
    return ImageItem(str(image_id), os.path.join(root, file_name))


def _check_root_holds_images(items: Sequence[ImageItem], root: str, json_path: str) -> None:
    """Fail early on a clearly wrong image root instead of recording every image as missing."""
    sample = items[:20]
    if sample and not any(os.path.exists(item.path) for item in sample):
        raise SourceError(
            f"none of the first {len(sample)} images of {json_path} exist under {root} "
            f"(e.g. {sample[0].path}); pass the folder that holds them with --image-root"
        )


# --- text list ------------------------------------------------------------------------------------
def _list_file_items(list_path: str, image_root: Optional[str]) -> List[ImageItem]:
    try:
        with open(list_path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError:
        raise SourceError(f"{list_path} is not a UTF-8 text file of image paths") from None
    except OSError as exc:
        raise SourceError(f"cannot read {list_path} ({exc})") from None
    root = os.path.abspath(
        image_root if image_root is not None else os.path.dirname(os.path.abspath(list_path))
    )
    items = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(root, os.path.expanduser(entry)))
        inside = os.path.commonpath([root, path]) == root
        items.append(ImageItem(_relative_id(path, root) if inside else path, path))
    _check_unique(items, list_path, "entries")
    return items


def _check_unique(items: Iterable[ImageItem], where: str, what: str) -> None:
    seen: Dict[str, int] = {}
    for k, item in enumerate(items):
        if item.image_id in seen:
            raise SourceError(
                f"{where}: image id {item.image_id!r} appears twice ({what} {seen[item.image_id]} "
                f"and {k}); ids must be unique"
            )
        seen[item.image_id] = k
