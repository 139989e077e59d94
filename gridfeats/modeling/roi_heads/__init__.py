from gridfeats.modeling.roi_heads.roi_heads import (
    AttributeRes5ROIHeads,
    AttributeStandardROIHeads,
    build_roi_heads,
)

__all__ = ["AttributeRes5ROIHeads", "AttributeStandardROIHeads", "build_roi_heads"]
