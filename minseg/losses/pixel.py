"""Per-pixel losses of segmentation_models_pytorch: focal, soft BCE, soft cross entropy, and MCC.

Follows smp losses/focal.py, soft_bce.py, soft_ce.py, mcc.py and _functional.py in their float order.
Shapes as in minseg/losses/region.py: "binary" y_pred Tensor[N, 1, H, W], "multiclass" Tensor[N, C, H, W] with
y_true int64 Tensor[N, H, W], "multilabel" y_true Tensor[N, C, H, W] of 0/1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minseg.losses.region import check_mode


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = 0.25,
                      reduction: str = "mean", normalized: bool = False, reduced_threshold: float | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) per element, then reduced; logits, target: same shape.

        bce = -t log(s) - (1 - t) log(1 - s),  s = sigmoid(logit);  pt = exp(-bce)
        loss = (1 - pt)^gamma * bce * (alpha t + (1 - alpha)(1 - t))      (the last factor only with alpha)
    reduced_threshold r: the focal factor is ((1 - pt) / r)^gamma, and 1 where pt < r (reduced focal loss).
    normalized: divided by max(sum of focal factors, eps). reduction: "mean" over elements, "sum", "none",
    or "batchwise_mean" (sum over dim 0).
    """
    target = target.to(dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = torch.exp(-bce)
    if reduced_threshold is None:
        focal = (1.0 - pt).pow(gamma)
    else:
        focal = torch.where(pt < reduced_threshold, 1.0, ((1.0 - pt) / reduced_threshold).pow(gamma))
    loss = focal * bce
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    if normalized:
        loss = loss / focal.sum().clamp_min(eps)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchwise_mean":
        return loss.sum(0)
    return loss


class FocalLoss(nn.Module):
    """smp.losses.FocalLoss: binary_focal_loss over the non-ignored pixels.

    binary: one loss over all pixels. multiclass and multilabel: one sigmoid focal loss per class (kept: smp's
    multiclass focal is one-vs-rest sigmoid, target [y == c], not a softmax focal loss), then the mean over classes,
    or sum(w_c * loss_c) / sum(w_c) with class_weights. from_logits=False takes probabilities, clamped to
    [eps, 1 - eps] and turned into logits log(p / (1 - p)) (multiclass: log p, smp's choice).
    Kept: eps is used only for that clamp; normalized divides by max(sum of focal factors, 1e-6) as in smp.
    """

    def __init__(self, mode: str, alpha: float | None = None, gamma: float = 2.0, ignore_index: int | None = None,
                 from_logits: bool = True, eps: float = 1e-7, reduction: str = "mean", normalized: bool = False,
                 reduced_threshold: float | None = None, class_weights: list[float] | None = None):
        super().__init__()
        check_mode(mode)
        if class_weights is not None and mode == "binary":
            raise ValueError("class_weights are not supported with mode='binary' (as in smp)")
        self.mode, self.ignore_index, self.from_logits, self.eps = mode, ignore_index, from_logits, eps
        self.options = dict(gamma=gamma, alpha=alpha, reduction=reduction, normalized=normalized,
                            reduced_threshold=reduced_threshold)
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        if not self.from_logits:
            y_pred = y_pred.clamp(self.eps, 1 - self.eps)
            y_pred = torch.log(y_pred) if self.mode == "multiclass" else torch.log(y_pred / (1 - y_pred))
        if self.mode == "binary":
            y_true, y_pred = y_true.reshape(-1), y_pred.reshape(-1)
            if self.ignore_index is not None:
                keep = y_true != self.ignore_index
                y_true, y_pred = y_true[keep], y_pred[keep]
            return binary_focal_loss(y_pred, y_true, **self.options)

        if self.ignore_index is not None and self.mode == "multiclass":
            keep = y_true != self.ignore_index  # (N, H, W), one mask for every class (saved once for backward)
        class_losses = []
        for c in range(y_pred.shape[1]):
            t = (y_true == c).long() if self.mode == "multiclass" else y_true[:, c, ...]
            p = y_pred[:, c, ...]
            if self.ignore_index is not None:
                if self.mode == "multilabel":  # each channel's own ignored pixels (smp indexes with the
                    keep = t != self.ignore_index  # (N, C, H, W) mask there and raises)
                t, p = t[keep], p[keep]
            class_losses.append(binary_focal_loss(p, t, **self.options))
        class_losses = torch.stack(class_losses)  # (C,)
        if self.class_weights is None:
            return class_losses.mean()
        weights = self.class_weights.to(class_losses.device)
        return (class_losses * weights).sum() / weights.sum()


class SoftBCEWithLogitsLoss(nn.Module):
    """smp.losses.SoftBCEWithLogitsLoss: torch's BCE with logits against smoothed targets, ignored pixels zeroed.

        t' = (1 - t) * s + t * (1 - s)   (smooth_factor s; t' = t without it)
        loss = weight * [pos_weight * t' * -log sigmoid(x) + (1 - t') * -log(1 - sigmoid(x))] * [t != ignore_index]
    reduction "mean" divides by all pixels, ignored ones included (kept: smp's), "sum", or "none".
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int | None = -100, reduction: str = "mean",
                 smooth_factor: float | None = None, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.ignore_index, self.reduction, self.smooth_factor = ignore_index, reduction, smooth_factor
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        s = self.smooth_factor
        soft = y_true if s is None else (1 - y_true) * s + y_true * (1 - s)
        loss = F.binary_cross_entropy_with_logits(y_pred, soft, self.weight, pos_weight=self.pos_weight,
                                                  reduction="none")
        if self.ignore_index is not None:
            loss = loss * (y_true != self.ignore_index).type_as(loss)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class SoftCrossEntropyLoss(nn.Module):
    """smp.losses.SoftCrossEntropyLoss: cross entropy with label smoothing (fairseq's form).

        lp = log_softmax(y_pred, dim);  nll = -lp[y];  smooth = -sum_c lp[c]
        loss = (1 - s) * reduce(nll) + s / C * reduce(smooth)      (smooth_factor s, C classes)
    Ignored pixels give 0 to both terms; "mean" divides by all pixels, ignored ones included (kept: smp's).
    With ignore_index set, reduction="none" keeps the class dim as size 1 (kept: smp's shape).
    smooth_factor=None means 0 here (smp raises a TypeError on None).
    """

    def __init__(self, reduction: str = "mean", smooth_factor: float | None = None, ignore_index: int | None = -100,
                 dim: int = 1):
        super().__init__()
        self.reduction, self.smooth_factor, self.ignore_index, self.dim = reduction, smooth_factor, ignore_index, dim

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        dim, s = self.dim, self.smooth_factor or 0.0
        log_prob = F.log_softmax(y_pred, dim=dim)
        target = y_true.unsqueeze(dim) if y_true.dim() == log_prob.dim() - 1 else y_true
        if self.ignore_index is not None:
            ignored = target.eq(self.ignore_index)
            nll = (-log_prob.gather(dim, target.masked_fill(ignored, 0))).masked_fill(ignored, 0.0)
            smooth = (-log_prob.sum(dim, keepdim=True)).masked_fill(ignored, 0.0)
        else:
            nll = (-log_prob.gather(dim, target)).squeeze(dim)
            smooth = (-log_prob.sum(dim, keepdim=True)).squeeze(dim)
        if self.reduction == "sum":
            nll, smooth = nll.sum(), smooth.sum()
        if self.reduction == "mean":
            nll, smooth = nll.mean(), smooth.mean()
        return (1.0 - s) * nll + s / log_prob.shape[dim] * smooth


class MCCLoss(nn.Module):
    """smp.losses.MCCLoss (binary): 1 - Matthews correlation of probabilities y_pred with 0/1 targets, over the batch.

        TP = sum p t + eps, TN = sum (1 - p)(1 - t) + eps, FP = sum p (1 - t) + eps, FN = sum (1 - p) t + eps
        loss = 1 - (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))
    y_pred are probabilities (no sigmoid is applied), Tensor[N, H, W] or [N, 1, H, W].
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        N = y_true.shape[0]
        p, t = y_pred.reshape(N, 1, -1), y_true.reshape(N, 1, -1)
        tp = torch.sum(p * t) + self.eps
        tn = torch.sum((1 - p) * (1 - t)) + self.eps
        fp = torch.sum(p * (1 - t)) + self.eps
        fn = torch.sum((1 - p) * t) + self.eps
        mcc = (tp * tn - fp * fn) / torch.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return 1.0 - mcc
