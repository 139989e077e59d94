"""``CfgNode``: fvcore's config node with gridfeats' file loading and clear override errors.

Why a subclass: yacs already does what Detectron2 relies on (literal-eval of strings, type checks
against the default with list<->tuple coercion, ``dump``, ``freeze``), so we keep it and change
only the edges users touch: ``merge_from_file`` reads YAML through our ``_BASE_`` loader, drops
keys of newer Detectron2 versions with a warning, refuses config versions other than 2, and puts
the file name into every error; ``merge_from_list`` reports unknown keys as
``KeyError: Non-existent config key: ...`` (yacs raises a bare AssertionError) and names the pair
that failed. The last merged file is remembered so reports can say which config was used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fvcore.common.config import CfgNode as _FvcoreCfgNode

from gridfeats.config.newer_keys import (
    drop_newer_detectron2_keys,
    is_newer_detectron2_key,
)
from gridfeats.config.yaml_loader import BASE_KEY, ConfigError, PathLike, load_yaml_with_base

logger = logging.getLogger(__name__)

# Stored in the node's __dict__ (not as a config key) so it survives clone() and pickling but
# never appears in dump().
_SOURCE_FILE_ATTR = "_gridfeats_source_file"
SUPPORTED_VERSION = 2


class CfgNode(_FvcoreCfgNode):
    """A Detectron2-style config node (yacs semantics), see the module docstring."""

    @classmethod
    def load_yaml_with_base(  # type: ignore[override]
        cls, filename: PathLike, allow_unsafe: bool = False
    ) -> Dict[str, Any]:
        """fvcore's entry point, routed to gridfeats' loader so there is one ``_BASE_`` logic.

        ``allow_unsafe`` exists for signature compatibility only: YAML tags that construct
        Python objects are never loaded.
        """
        if allow_unsafe:
            raise ConfigError("unsafe YAML loading is not supported; use plain YAML values")
        return load_yaml_with_base(filename)

    def merge_from_file(self, cfg_filename: PathLike) -> None:  # type: ignore[override]
        """Merge a YAML file (with its ``_BASE_`` chain) into this node.

        Raises FileNotFoundError, KeyError ("Non-existent config key: ...") or ConfigError
        (a ValueError), each naming the file.
        """
        path = Path(cfg_filename)
        raw = load_yaml_with_base(path)
        dropped = drop_newer_detectron2_keys(raw)
        if dropped:
            _warn_dropped(dropped, source=str(path))
        self._check_version(raw.get("VERSION"), path)
        try:
            loaded = type(self)(raw)
        except AssertionError as exc:  # yacs: a YAML value of a type configs cannot hold
            raise ConfigError(f"{path}: {exc}") from None
        try:
            self.merge_from_other_cfg(loaded)
        except KeyError as exc:
            raise KeyError(f"{exc.args[0]} (in {path})") from None
        except ValueError as exc:
            raise ConfigError(f"{exc} (in {path})") from None
        _follow_weight_decay_if_null(self)
        self.__dict__[_SOURCE_FILE_ATTR] = path

    def merge_from_list(self, cfg_list: Sequence[Any]) -> None:  # type: ignore[override]
        """Merge flat ``[KEY, VALUE, KEY, VALUE, ...]`` overrides (values literal-eval'd if str).

        Each value must have the default's type (list and tuple convert into each other; None
        fits anything). Keys of newer Detectron2 versions are dropped with a warning.
        """
        cfg_list = list(cfg_list)
        if len(cfg_list) % 2 != 0:
            raise ConfigError(
                f"overrides must be KEY VALUE pairs, got an odd number of items: {cfg_list}"
            )
        dropped: List[str] = []
        for key, value in zip(cfg_list[0::2], cfg_list[1::2]):
            if not isinstance(key, str) or not key:
                raise ConfigError(f"override key must be a non-empty string, got {key!r}")
            if key == BASE_KEY:
                raise ConfigError(f"{BASE_KEY} can only be used inside config files")
            if is_newer_detectron2_key(key):
                dropped.append(key)
                continue
            if not self._has_key(key):
                raise KeyError(f"Non-existent config key: {key}")
            try:
                super().merge_from_list([key, value])
            except ValueError as exc:
                raise ConfigError(f"bad override {key} {value!r}: {exc}") from None
        if dropped:
            _warn_dropped(sorted(dropped), source="overrides")
        _follow_weight_decay_if_null(self)

    def _has_key(self, full_key: str) -> bool:
        node: Any = self
        for part in full_key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def _check_version(self, version: Any, path: Path) -> None:
        # Detectron2 would upgrade a VERSION 1 file; none of the configs we serve needs that, so
        # it is refused rather than half-supported. A file without VERSION is read as version 2.
        if "VERSION" not in self or version is None or version == SUPPORTED_VERSION:
            return
        raise ConfigError(
            f"{path}: config VERSION {version!r} is not supported; gridfeats reads Detectron2 "
            f"VERSION {SUPPORTED_VERSION} configs (upgrade older files with Detectron2 first)"
        )


def cfg_source_path(cfg: CfgNode) -> Optional[Path]:
    """The YAML file last merged into ``cfg`` (as given, before ``_BASE_``), or None."""
    return cfg.__dict__.get(_SOURCE_FILE_ATTR)


def cfg_source_name(cfg: CfgNode) -> str:
    """Short config name for reports and stored metadata, e.g. ``"R-50-grid"``.

    The stem of the last merged YAML (``.../R-50-grid.yaml`` -> ``"R-50-grid"``), or
    ``"defaults"`` when no file was merged (plain defaults, perhaps with overrides).
    """
    path = cfg_source_path(cfg)
    return path.stem if path is not None else "defaults"


def _warn_dropped(keys: List[str], source: str) -> None:
    logger.warning(
        "Ignoring config keys that newer Detectron2 versions added (not in Detectron2@ffff8ac, "
        "no effect on these models) from %s: %s",
        source,
        ", ".join(keys),
    )


def _follow_weight_decay_if_null(cfg: CfgNode) -> None:
    # Newer Detectron2 dumps SOLVER.WEIGHT_DECAY_BIAS: null, meaning "same as WEIGHT_DECAY".
    # ffff8ac has no such meaning for None, so the value it stands for is written in.
    solver = cfg.get("SOLVER")
    if isinstance(solver, dict) and "WEIGHT_DECAY_BIAS" in solver:
        if solver["WEIGHT_DECAY_BIAS"] is None:
            solver["WEIGHT_DECAY_BIAS"] = solver.get("WEIGHT_DECAY")
            logger.warning(
                "SOLVER.WEIGHT_DECAY_BIAS is null (newer Detectron2: follow WEIGHT_DECAY); "
                "using SOLVER.WEIGHT_DECAY = %r",
                solver["WEIGHT_DECAY_BIAS"],
            )
