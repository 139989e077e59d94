from gridfeats.structures.boxes import box_area, clip_boxes_, nonempty, pairwise_iou, scale_boxes_
from gridfeats.structures.image_list import ImageList

__all__ = ["ImageList", "box_area", "clip_boxes_", "nonempty", "pairwise_iou", "scale_boxes_"]
