from minseg.ops.fast_nms import batched_box_iou, cross_class_fast_nms, fast_nms
from minseg.ops.yolact_boxes import crop_masks, decode_yolact, sanitize_coordinates, yolact_priors
