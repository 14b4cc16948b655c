"""Lovasz losses (Berman et al. 2018) as segmentation_models_pytorch has them (losses/lovasz.py).

The Jaccard loss of a set of pixels is a set function of the mispredicted pixels; its Lovasz extension is
piecewise linear in the per-pixel errors e: sort the errors in decreasing order, e_(1) >= ... >= e_(P), and
    loss = sum_i e_(i) * (J_i - J_(i-1)),   J_i = 1 - |gt \\ first i| / |gt union first i|
(J_i is the Jaccard loss when the i largest errors are the mispredicted pixels; J_0 = 0).
Binary ("binary" and "multilabel" modes, all channels flattened together): the Lovasz hinge, errors
e = max(0, 1 - logit * sign), sign = +1 on foreground, -1 on background. Multiclass: Lovasz-softmax, errors
e = |[y == c] - softmax_c| per class present in the targets, averaged over those classes.
per_image: the loss of each image, averaged over the batch; otherwise one loss over the batch.
Pixels whose target is ignore_index are dropped first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minseg.losses.region import check_mode


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """J_i - J_(i-1) for i = 1..P, from the 0/1 ground truth in decreasing-error order: Tensor[P] -> Tensor[P]."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.float().cumsum(0)
    union = gts + (1 - gt_sorted).float().cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])  # (P,)


def lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovasz hinge of Tensor[P] logits against Tensor[P] 0/1 labels."""
    if labels.numel() == 0:
        return logits.sum() * 0.0  # only ignored pixels: zero loss, zero gradients
    errors = 1.0 - logits * (2.0 * labels.float() - 1.0)
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)
    return torch.dot(F.relu(errors_sorted), lovasz_grad(labels[order]))


def lovasz_softmax_flat(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz-softmax of Tensor[P, C] probabilities against Tensor[P] labels: the mean over present classes."""
    if probs.numel() == 0:
        # smp returns probs * 0.0 here, an empty tensor that cannot be backpropagated; minseg a scalar zero
        return probs.sum() * 0.0
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).type_as(probs)
        if fg.sum() == 0:  # only classes present in the targets
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[order])))
    return average(losses)


def average(values: list[torch.Tensor]) -> torch.Tensor | int:
    """Sum left to right, then divide by the count (smp's `mean`, its float order); 0 for no values (kept: smp's
    int 0)."""
    if not values:
        return 0
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total if len(values) == 1 else total / len(values)


def drop_ignored(scores: torch.Tensor, labels: torch.Tensor, ignore_index: int | None):
    """Tensor[P, ...] scores and Tensor[P] labels without the pixels labelled ignore_index."""
    if ignore_index is None:
        return scores, labels
    keep = labels != ignore_index
    return scores[keep], labels[keep]


class LovaszLoss(nn.Module):
    """smp.losses.LovaszLoss(mode, per_image=False, ignore_index=None, from_logits=True).

    binary / multilabel: Lovasz hinge on logits y_pred against 0/1 y_true of the same number of elements.
    multiclass: Lovasz-softmax on softmax(y_pred: Tensor[N, C, H, W]) against y_true: Tensor[N, H, W].
    Kept: from_logits is accepted and unused, as in smp (the hinge takes logits, the softmax form applies softmax).
    """

    def __init__(self, mode: str, per_image: bool = False, ignore_index: int | None = None, from_logits: bool = True):
        super().__init__()
        check_mode(mode)
        self.mode, self.per_image, self.ignore_index, self.from_logits = mode, per_image, ignore_index, from_logits

    def loss_of(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """The loss of one group of pixels: y_pred Tensor[B, ...] (B images), y_true the matching labels."""
        if self.mode == "multiclass":
            C = y_pred.shape[1]
            probs = torch.movedim(y_pred, 1, -1).reshape(-1, C)  # (B*H*W, C)
            return lovasz_softmax_flat(*drop_ignored(probs, y_true.reshape(-1), self.ignore_index))
        return lovasz_hinge_flat(*drop_ignored(y_pred.reshape(-1), y_true.reshape(-1), self.ignore_index))

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiclass":
            y_pred = y_pred.softmax(dim=1)
        if not self.per_image:
            return self.loss_of(y_pred, y_true)
        return average([self.loss_of(p[None], t[None]) for p, t in zip(y_pred, y_true)])
