"""Feature makers: prepared images -> feature-store records, shared by extraction and the service.

* :mod:`~gridfeats.features.makers`: grid and region makers (one interface: ``mode``,
  ``feature_dim``, ``attr_topk``, ``settings()``, ``records(prepared)``);
* :mod:`~gridfeats.features.selection`: which boxes region features come from (Detectron2's
  inference, or bottom-up-attention's rule) and the top-k attributes;
* :mod:`~gridfeats.features.checks`: whether a record can be stored or served faithfully.
"""

from gridfeats.features.checks import storage_problem
from gridfeats.features.makers import (
    FeatureSpec,
    GridFeatureMaker,
    RegionFeatureMaker,
    make_feature_maker,
)
from gridfeats.features.selection import (
    BOX_SOURCES,
    REGION_RULES,
    BottomUpSettings,
    top_attributes,
)

__all__ = [
    "BOX_SOURCES",
    "REGION_RULES",
    "BottomUpSettings",
    "FeatureSpec",
    "GridFeatureMaker",
    "RegionFeatureMaker",
    "make_feature_maker",
    "storage_problem",
    "top_attributes",
]
