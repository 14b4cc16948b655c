"""Training losses for the semantic models.

segmentation_loss is torchvision's reference criterion for FCN and DeepLabV3 (references/segmentation/train.py).
The classes are segmentation_models_pytorch's losses (smp.losses) under smp's names and arguments, written as
plain tensor math with smp's values and gradients: region.py (Dice, Jaccard, Tversky), pixel.py (focal, soft
BCE, soft cross entropy, MCC), lovasz.py (Lovasz hinge and Lovasz-softmax). Each class states its formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minseg.losses.lovasz import LovaszLoss
from minseg.losses.pixel import FocalLoss, MCCLoss, SoftBCEWithLogitsLoss, SoftCrossEntropyLoss
from minseg.losses.region import DiceLoss, JaccardLoss, TverskyLoss

BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE = "binary", "multiclass", "multilabel"

__all__ = ["segmentation_loss", "DiceLoss", "JaccardLoss", "FocalLoss", "LovaszLoss", "TverskyLoss",
           "SoftBCEWithLogitsLoss", "SoftCrossEntropyLoss", "MCCLoss",
           "BINARY_MODE", "MULTICLASS_MODE", "MULTILABEL_MODE"]


def segmentation_loss(outputs: dict[str, torch.Tensor] | torch.Tensor, target: torch.Tensor, *,
                      ignore_index: int = 255, aux_weight: float = 0.5) -> torch.Tensor:
    """CE(out) + aux_weight * CE(aux): torchvision's reference criterion for FCN / DeepLabV3.

    outputs: the model's {"out": Tensor[N, C, H, W]} (+ "aux"), or one logits tensor; target: Tensor[N, H, W] int64.
    CE is the cross entropy averaged over the pixels whose target is not ignore_index (NaN if there are none,
    as torch's). Returns the scalar objective.
    """
    if isinstance(outputs, torch.Tensor):
        outputs = {"out": outputs}
    losses = {name: F.cross_entropy(x, target, ignore_index=ignore_index) for name, x in outputs.items()}
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + aux_weight * losses["aux"]
