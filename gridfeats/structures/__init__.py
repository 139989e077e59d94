from gridfeats.structures.boxes import box_area, clip_boxes_, nonempty, pairwise_iou, scale_boxes_
from gridfeats.structures.image_list import ImageList
from gridfeats.structures.instances import Instances

__all__ = [
    "ImageList",
    "Instances",
    "box_area",
    "clip_boxes_",
    "nonempty",
    "pairwise_iou",
    "scale_boxes_",
]
