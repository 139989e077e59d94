"""Detectron2-compatible configuration for the grid-feats-vqa models.

    from gridfeats.config import get_cfg, cfg_source_name
    cfg = get_cfg("R-50-grid", opts=["MODEL.DEVICE", "cpu"])   # shipped name or a YAML path
    cfg.MODEL.RESNETS.DEPTH            # 50
    cfg_source_name(cfg)               # "R-50-grid"

The defaults are Detectron2@ffff8ac's plus grid-feats' attribute keys, so ``cfg.dump()`` equals
the reference dump; see ``defaults.py`` for why that version, ``newer_keys.py`` for how configs
written by newer Detectron2 versions are accepted.
"""

from gridfeats.config.build import (
    SHIPPED_CONFIG_DIR,
    get_cfg,
    resolve_config_file,
    shipped_config_names,
)
from gridfeats.config.defaults import add_attribute_config, detectron2_defaults
from gridfeats.config.newer_keys import NEWER_DETECTRON2_KEYS
from gridfeats.config.node import CfgNode, cfg_source_name, cfg_source_path
from gridfeats.config.yaml_loader import ConfigError, load_yaml_with_base

__all__ = [
    "CfgNode",
    "ConfigError",
    "NEWER_DETECTRON2_KEYS",
    "SHIPPED_CONFIG_DIR",
    "add_attribute_config",
    "cfg_source_name",
    "cfg_source_path",
    "detectron2_defaults",
    "get_cfg",
    "load_yaml_with_base",
    "resolve_config_file",
    "shipped_config_names",
]
