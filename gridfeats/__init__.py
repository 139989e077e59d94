"""gridfeats: Detectron2-compatible grid and region features for vision-and-language work.

Public entry points (imported lazily so ``import gridfeats`` stays light):

    gridfeats.get_cfg(config_file, opts)   # Detectron2-style config: _BASE_, KEY VALUE overrides
    gridfeats.Detector(cfg, weights, device)
    gridfeats.FeatureStore(path)           # reader of the HDF5 feature store
    gridfeats.build_model(cfg, weights)    # the detector in train mode (FREEZE_AT, FrozenBN)
    gridfeats.build_optimizer(cfg, model)  # Detectron2's SGD with one group per trainable tensor
    gridfeats.build_lr_scheduler(cfg, opt) # WarmupMultiStepLR / WarmupCosineLR
"""

from gridfeats.version import __version__

_LAZY = {
    "get_cfg": ("gridfeats.config", "get_cfg"),
    "CfgNode": ("gridfeats.config", "CfgNode"),
    "Detector": ("gridfeats.api", "Detector"),
    "FeatureStore": ("gridfeats.store", "FeatureStore"),
    "build_model": ("gridfeats.modeling", "build_model"),
    "build_optimizer": ("gridfeats.solver", "build_optimizer"),
    "build_lr_scheduler": ("gridfeats.solver", "build_lr_scheduler"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'gridfeats' has no attribute {name!r}")
