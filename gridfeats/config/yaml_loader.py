"""Read a config YAML and resolve its ``_BASE_`` chain into one plain nested dict.

Why not fvcore's loader: the semantics are the same (bases relative to the including file's
directory, string or list form, child merged over base at the raw-dict level, ``_BASE_`` removed),
but user files deserve specific errors instead of tracebacks from deep inside fvcore: a missing
base names the file that asked for it, an include cycle is reported as such, and a YAML that is not
a mapping says so. Only ``yaml.safe_load`` is used: tags that would run code are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import yaml

from gridfeats.errors import GridfeatsError

BASE_KEY = "_BASE_"

PathLike = Union[str, "os.PathLike[str]"]


class ConfigError(GridfeatsError, ValueError):
    """A config file or override that cannot be used; the message says which and why."""


def load_yaml_with_base(filename: PathLike) -> Dict[str, Any]:
    """Load ``filename`` with all its ``_BASE_`` files merged underneath it.

    Returns the merged raw dict (values exactly as YAML parsed them; no type checks yet).
    Raises FileNotFoundError for a missing file and ConfigError for unusable content.
    """
    return _load(Path(filename), chain=[])


def merge_raw_dicts(child: Dict[str, Any], base: Dict[str, Any]) -> None:
    """Merge ``child`` into ``base`` in place: dicts merge key by key, anything else replaces.

    A list or tuple in the child replaces the base's value wholesale (no element-wise merge), as
    Detectron2 does; a child dict over a base scalar is an error since it cannot be inherited.
    """
    for key, value in child.items():
        if isinstance(value, dict) and key in base:
            if not isinstance(base[key], dict):
                raise ConfigError(
                    f"cannot merge a mapping into key {key!r}: the base file sets it to "
                    f"the non-mapping value {base[key]!r}"
                )
            merge_raw_dicts(value, base[key])
        else:
            base[key] = value


def _load(path: Path, chain: List[Path]) -> Dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in [*chain, resolved])
        raise ConfigError(f"_BASE_ include cycle: {cycle}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = _read_mapping(path)
    if BASE_KEY not in raw:
        return raw

    bases = _base_paths(raw.pop(BASE_KEY), path)
    merged: Dict[str, Any] = {}
    for base_path in bases:
        try:
            base_raw = _load(base_path, [*chain, resolved])
        except FileNotFoundError:
            raise FileNotFoundError(
                f"_BASE_ file not found: {base_path} (included from {path})"
            ) from None
        merge_raw_dicts(base_raw, merged)
    merge_raw_dicts(raw, merged)
    return merged


def _read_mapping(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config file {path}: {_one_line(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    if raw is None:  # an empty file (or only comments) changes nothing
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, not a {type(raw).__name__}"
        )
    _check_keys_are_strings(raw, path, prefix="")
    return raw


def _check_keys_are_strings(node: Dict[Any, Any], path: Path, prefix: str) -> None:
    for key, value in node.items():
        if not isinstance(key, str):
            raise ConfigError(f"config file {path}: key {prefix}{key!r} must be a string")
        if isinstance(value, dict):
            _check_keys_are_strings(value, path, prefix=f"{prefix}{key}.")


def _base_paths(value: Any, including: Path) -> List[Path]:
    names: Sequence[Any] = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigError(
            f"{including}: _BASE_ must be a file name or a list of file names, got {value!r}"
        )
    return [_resolve_base(name, including) for name in names]


def _resolve_base(name: str, including: Path) -> Path:
    if name.startswith(("http://", "https://")):
        raise ConfigError(f"{including}: _BASE_ {name!r} is a URL; only local files are read")
    expanded = Path(os.path.expanduser(name))
    if expanded.is_absolute():
        return expanded
    return including.parent / expanded


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return " ".join(text.split()) if text else type(exc).__name__
