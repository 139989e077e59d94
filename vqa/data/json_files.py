"""Reading the JSON files of VQA, VizWiz and COCO captions, given as a path or already loaded.

Every public entry point of ``vqa.data`` and ``vqa.metrics`` accepts either form, so a training
loop can pass the dicts it holds in memory while a command line passes paths. A missing file or
broken JSON becomes a ``DataFormatError`` naming the file and the role it plays, instead of a
bare ``FileNotFoundError``/``JSONDecodeError`` traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from gridfeats.errors import GridfeatsError

JsonSource = Union[str, "os.PathLike[str]", Mapping[str, Any], Sequence[Any]]


class DataFormatError(GridfeatsError, ValueError):
    """An input file or object that does not have the expected content; the message says why."""


def read_json(source: JsonSource, what: str) -> Any:
    """Returns the loaded JSON of ``source`` (a path, or an already loaded dict/list).

    ``what`` names the role of the file ("VQA annotations", "results") for error messages.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DataFormatError(f"{what} file not found: {path}")
        try:
            with path.open("r", encoding="utf-8") as handle:
                return json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{what} file {path} is not valid JSON: {exc}") from None
        except UnicodeDecodeError:
            raise DataFormatError(f"{what} file {path} is not UTF-8 text") from None
    if isinstance(source, (Mapping, list, tuple)):
        return source
    raise DataFormatError(
        f"{what} must be a path or loaded JSON (dict or list), got {type(source).__name__}"
    )


def require_keys(entry: Any, keys: Sequence[str], what: str) -> None:
    """Raises ``DataFormatError`` unless ``entry`` is a dict holding every key of ``keys``."""
    if not isinstance(entry, Mapping):
        raise DataFormatError(f"{what} must be a JSON object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DataFormatError(f"{what} lacks the key(s) {', '.join(map(repr, missing))}")
