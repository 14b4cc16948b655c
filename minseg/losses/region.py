"""Region losses of segmentation_models_pytorch: Dice, Jaccard (IoU) and Tversky, one score per class.

All three score a class c over every pixel of the batch (smp's dims=(0, 2)) with p the predicted probability
and t the 0/1 target:
    TP = sum p*t,  FP = sum p*(1 - t),  FN = sum (1 - p)*t
    tversky_c = (TP + smooth) / max(TP + alpha*FP + beta*FN + smooth, eps)
Dice is alpha = beta = 1/2 (= 2TP / (sum p + sum t)), Jaccard alpha = beta = 1 (= TP / |p union t|).
The loss of a class is 1 - score (or -log(max(score, eps)) with log_loss), zero for a class with no target pixel
in the batch; the loss is the mean over classes (or the class_weights-weighted mean), to the power gamma for
Tversky. Follows smp losses/dice.py, jaccard.py, tversky.py and _functional.py, in its float order.

Modes (smp's): "binary"   y_pred Tensor[N, 1, H, W] logits, y_true Tensor[N, H, W] or [N, 1, H, W] of 0/1;
               "multiclass" y_pred Tensor[N, C, H, W] logits, y_true Tensor[N, H, W] int64 in 0..C-1;
               "multilabel" y_pred Tensor[N, C, H, W] logits, y_true Tensor[N, C, H, W] of 0/1.
With from_logits the probabilities are exp(log_softmax) (multiclass) or exp(logsigmoid) (others), smp's form.
Pixels whose target is ignore_index count as p = t = 0 for every class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("binary", "multiclass", "multilabel")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def class_probabilities(y_pred: torch.Tensor, y_true: torch.Tensor, mode: str, from_logits: bool,
                        ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (p, t), both Tensor[N, C, H*W] (C = 1 in binary mode), ignored pixels zero in both; t in y_pred's dtype."""
    if y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(f"batch sizes differ: y_pred {tuple(y_pred.shape)}, y_true {tuple(y_true.shape)}")
    if from_logits:  # smp's log-then-exp form of softmax / sigmoid
        y_pred = y_pred.log_softmax(dim=1).exp() if mode == "multiclass" else F.logsigmoid(y_pred).exp()
    N, C = y_true.shape[0], y_pred.shape[1]

    if mode == "multiclass":
        y_true = y_true.reshape(N, -1)           # (N, H*W)
        y_pred = y_pred.reshape(N, C, -1)        # (N, C, H*W)
        if ignore_index is not None:
            keep = y_true != ignore_index
            y_pred = y_pred * keep.unsqueeze(1)
            y_true = F.one_hot((y_true * keep).to(torch.long), C)  # (N, H*W, C); ignored pixels read as class 0 ...
            y_true = y_true.permute(0, 2, 1) * keep.unsqueeze(1)   # (N, C, H*W); ... and are then zeroed
        else:
            y_true = F.one_hot(y_true, C).permute(0, 2, 1)         # (N, C, H*W)
    else:
        y_true = y_true.reshape(N, C, -1)        # (N, C, H*W); binary: C = 1
        y_pred = y_pred.reshape(N, C, -1)
        if ignore_index is not None:
            keep = y_true != ignore_index
            y_pred, y_true = y_pred * keep, y_true * keep
    return y_pred, y_true.type_as(y_pred)


def tversky_score(p: torch.Tensor, t: torch.Tensor, alpha: float, beta: float, smooth: float, eps: float,
                  dims: tuple[int, ...] = (0, 2)) -> torch.Tensor:
    """(TP + smooth) / max(TP + alpha*FP + beta*FN + smooth, eps) over `dims`: Tensor[N, C, P] -> Tensor[C]."""
    p_sum, t_sum = p.sum(dims), t.sum(dims)
    # kept: smp's TP = (sum p + sum t - |p - t|_1) / 2, which is sum p*t for 0/1 targets, in smp's rounding
    tp = (p_sum + t_sum - torch.linalg.vector_norm(p - t, ord=1, dim=dims)) / 2
    fp, fn = p_sum - tp, t_sum - tp
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth).clamp_min(eps)


class TverskyLoss(nn.Module):
    """smp.losses.TverskyLoss: (mean over classes of 1 - tversky_c) ** gamma; alpha weighs FP, beta FN.

    classes: the classes averaged (all by default; not in binary mode). class_weights: a weighted mean
    sum(w_c * loss_c) / sum(w_c) instead (multiclass and multilabel). A class without target pixels has loss 0
    and still counts in the mean (kept: smp's). Reduction: one score per class over the whole batch.
    """

    def __init__(self, mode: str, classes: list[int] | None = None, log_loss: bool = False, from_logits: bool = True,
                 smooth: float = 0.0, ignore_index: int | None = None, eps: float = 1e-7, alpha: float = 0.5,
                 beta: float = 0.5, gamma: float = 1.0, class_weights: list[float] | None = None):
        super().__init__()
        check_mode(mode)
        if mode == "binary" and (classes is not None or class_weights is not None):
            raise ValueError("classes and class_weights are not supported with mode='binary' (as in smp)")
        self.mode, self.log_loss, self.from_logits = mode, log_loss, from_logits
        self.smooth, self.ignore_index, self.eps = smooth, ignore_index, eps
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float)

    def per_class(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """Tensor[C] of class losses, zero where the class has no target pixel in the batch."""
        p, t = class_probabilities(y_pred, y_true, self.mode, self.from_logits, self.ignore_index)
        score = tversky_score(p, t, self.alpha, self.beta, self.smooth, self.eps)
        loss = -torch.log(score.clamp_min(self.eps)) if self.log_loss else 1.0 - score
        return loss * (t.sum((0, 2)) > 0).to(loss.dtype)  # a class absent from the targets contributes 0

    def mean_over_classes(self, loss: torch.Tensor) -> torch.Tensor:
        if self.classes is not None:
            loss = loss[self.classes]
        if self.class_weights is None:
            return loss.mean()
        weights = self.class_weights.to(loss.device)
        if self.classes is not None:
            weights = weights[self.classes]
        return (loss * weights).sum() / weights.sum()

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        loss = self.mean_over_classes(self.per_class(y_pred, y_true))
        return loss if self.gamma == 1.0 else loss ** self.gamma


class DiceLoss(TverskyLoss):
    """smp.losses.DiceLoss: mean over classes of 1 - dice_c, dice_c = 2TP / (sum p + sum t) (with smooth, eps
    as in tversky_score at alpha = beta = 1/2). Arguments as TverskyLoss without alpha, beta, gamma."""

    def __init__(self, mode: str, classes: list[int] | None = None, log_loss: bool = False, from_logits: bool = True,
                 smooth: float = 0.0, ignore_index: int | None = None, eps: float = 1e-7,
                 class_weights: list[float] | None = None):
        super().__init__(mode, classes, log_loss, from_logits, smooth, ignore_index, eps, 0.5, 0.5, 1.0, class_weights)


class JaccardLoss(TverskyLoss):
    """smp.losses.JaccardLoss: mean over classes of 1 - iou_c, iou_c = TP / (TP + FP + FN) (with smooth, eps
    as in tversky_score at alpha = beta = 1). Arguments as TverskyLoss without alpha, beta, gamma."""

    def __init__(self, mode: str, classes: list[int] | None = None, log_loss: bool = False, from_logits: bool = True,
                 smooth: float = 0.0, ignore_index: int | None = None, eps: float = 1e-7,
                 class_weights: list[float] | None = None):
        super().__init__(mode, classes, log_loss, from_logits, smooth, ignore_index, eps, 1.0, 1.0, 1.0, class_weights)
