"""``get_cfg``: the one way to build a config (defaults + attribute keys + YAML + overrides).

Why one function: Detectron2 spreads this over ``get_cfg()``, ``add_attribute_config``,
``merge_from_file``, ``merge_from_list`` and ``freeze``, and forgetting ``add_attribute_config``
(or calling it after the merge) breaks every grid-feats YAML. Callers here get the right order
for free. Shipped configs can be named bare (``"R-50-grid"``) so CLIs and the service do not need
to know where the repository's ``configs/`` folder is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

from gridfeats.config.defaults import add_attribute_config, detectron2_defaults
from gridfeats.config.node import CfgNode

# The repository's configs/ folder (beside the gridfeats package in a checkout or editable
# install), else the copy a regular install puts under <prefix>/share/gridfeats/configs.
_REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SHIPPED_CONFIG_DIR = (
    _REPO_CONFIG_DIR
    if _REPO_CONFIG_DIR.is_dir()
    else Path(sys.prefix) / "share" / "gridfeats" / "configs"
)


def get_cfg(
    config_file: Union[str, "os.PathLike[str]", None] = None,
    opts: Optional[Sequence[str]] = None,
    freeze: bool = True,
) -> CfgNode:
    """Build the effective config, as grid-feats-vqa's ``setup()`` on Detectron2@ffff8ac would.

    Args:
        config_file: a YAML path, or the bare name of a shipped config (``"R-50-grid"`` or
            ``"R-50-grid.yaml"``); None for the plain defaults.
        opts: flat ``KEY VALUE`` overrides, e.g. ``["INPUT.MIN_SIZE_TEST", "800"]``; string
            values are literal-eval'd (``"(360, 600)"`` becomes a tuple) and type-checked.
        freeze: return an immutable config (``cfg.defrost()`` undoes it).

    Raises:
        FileNotFoundError: the file (or a ``_BASE_`` file) does not exist.
        KeyError: ``Non-existent config key: ...`` for a key neither version of Detectron2 has.
        ValueError: (``ConfigError``) unparsable YAML, a value of the wrong type, bad overrides.
    """
    cfg = add_attribute_config(detectron2_defaults())
    if config_file is not None:
        cfg.merge_from_file(resolve_config_file(config_file))
    if opts:
        cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg


def resolve_config_file(config_file: Union[str, "os.PathLike[str]"]) -> Path:
    """Turn a path or a shipped config's bare name into the path of an existing YAML file.

    An existing path always wins; otherwise a name without directory parts is looked up in
    ``SHIPPED_CONFIG_DIR`` with or without its ``.yaml`` suffix.
    """
    path = Path(config_file).expanduser()
    if path.is_file():
        return path
    if path.parent == Path("."):
        for candidate in (path.name, f"{path.name}.yaml"):
            shipped = SHIPPED_CONFIG_DIR / candidate
            if shipped.is_file():
                return shipped
        raise FileNotFoundError(
            f"config {str(config_file)!r} is neither a file nor a shipped config; shipped "
            f"configs: {', '.join(shipped_config_names()) or '(none found)'}"
        )
    raise FileNotFoundError(f"config file not found: {path}")


def shipped_config_names() -> List[str]:
    """Bare names of the configs in ``SHIPPED_CONFIG_DIR`` (sorted), e.g. ``"X-152-challenge"``."""
    if not SHIPPED_CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.yaml"))
