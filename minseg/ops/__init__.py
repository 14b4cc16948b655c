"""Operators in plain tensor ops: drop-in equivalents of torchvision.ops plus each original's box, anchor
and mask helpers. See each module's docstring for the original it follows."""
from minseg.ops.anchors import (AnchorGenerator, DefaultAnchorGenerator, detectron2_cell_anchors, grid_anchors,
                                torchvision_cell_anchors)
from minseg.ops.box_coders import Box2BoxTransform, BoxCoder
from minseg.ops.boxes import batched_nms, box_area, box_iou, clip_boxes_to_image, nms, remove_small_boxes
from minseg.ops.fast_nms import cross_class_fast_nms, fast_nms
from minseg.ops.masks import expand_boxes, paste_masks_detectron2, paste_masks_torchvision
from minseg.ops.poolers import (MultiScaleRoIAlign, assign_levels_detectron2, assign_levels_torchvision,
                                multiscale_roi_align, shared_feature_tables)
from minseg.ops.feature_table import feature_table
from minseg.ops.roi_align import RoIAlign, boxes_to_rois, roi_align, roi_align_table
from minseg.ops.yolact_boxes import crop_masks, decode_yolact, sanitize_coordinates, yolact_priors
