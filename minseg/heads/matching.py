"""Training-time target assignment: match predictions (anchors, proposals) to ground truth, then sample a
balanced subset of positives and negatives for the losses.

    IoU Tensor[G, N] -> Matcher -> per prediction (matched gt index, label 1 / 0 / -1)
    labels Tensor[N] -> BalancedSampler -> (positive indices, negative indices), drawn with torch.randperm

Both originals (torchvision models/detection/_utils.py Matcher and BalancedPositiveNegativeSampler;
detectron2 modeling/matcher.py and sampling.py subsample_labels) follow the same rules. Where they differ the
difference is a parameter here:
  - an image without ground truth: torchvision's callers skip the matcher and label everything background,
    detectron2's Matcher does so itself; here the Matcher does it for both.
  - the background label: torchvision's RoI heads use 0 (labels 1..K are classes), detectron2's use K
    (`background_label` of the sampler); both RPNs use 0.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """Assign each prediction its best ground truth by a quality matrix (IoU), labelled by thresholds.

    thresholds t_1 < ... split quality values into intervals; labels gives one label per interval:
    RPN (both originals): thresholds (0.3, 0.7), labels (0, -1, 1): IoU < 0.3 background, [0.3, 0.7) ignored,
    >= 0.7 foreground. RoI heads: thresholds (0.5,), labels (0, 1).
    allow_low_quality_matches: also make foreground every prediction that is the best match (ties included)
    of some ground truth, even below the thresholds (so every gt has an anchor; both RPNs).

    __call__(quality: Tensor[G, N]) -> (matches Tensor[N] int64, the argmax gt index, 0 when there is no gt;
    labels Tensor[N] int8 in {1, 0, -1}).
    """

    def __init__(self, thresholds: list[float], labels: list[int], allow_low_quality_matches: bool = False):
        if len(labels) != len(thresholds) + 1 or list(thresholds) != sorted(thresholds):
            raise ValueError(f"need increasing thresholds and one label more: {thresholds}, {labels}")
        self.thresholds = [-float("inf")] + list(thresholds) + [float("inf")]
        self.labels = list(labels)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        G, N = quality.shape
        if G == 0:  # no objects: every prediction is background (labels[0])
            return (quality.new_zeros(N, dtype=torch.int64),
                    quality.new_full((N,), self.labels[0], dtype=torch.int8))
        best, matches = quality.max(dim=0)                                           # (N,), (N,)
        labels = matches.new_full((N,), 1, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            labels[(best >= low) & (best < high)] = label
        if self.allow_low_quality_matches:
            # every prediction tied for the best quality of some gt (even a quality of 0) becomes foreground;
            # its match stays its own argmax gt (both originals)
            best_per_gt = quality.max(dim=1)[0]                                      # (G,)
            low_quality = torch.where(quality == best_per_gt[:, None])[1]
            labels[low_quality] = 1
        return matches, labels


class BalancedSampler:
    """Sample up to `batch_size_per_image` predictions per image, at most `positive_fraction` of them positive,
    the rest negative; ignored ones (-1) are never drawn.

    Draws as both originals: per image, torch.randperm over the positives, then over the negatives, from torch's
    global generator, keeping the first of each permutation (so a seed picks the same elements).
    background_label: the label of negatives (0 in torchvision and in both RPNs; K in detectron2's RoI heads).
    sort: return indices in increasing order (torchvision returns masks, which its callers turn into sorted
    indices) or in the permutation's order (detectron2).
    __call__(labels: list of Tensor[N_i] per image) -> list of (positive indices, negative indices) per image.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float, background_label: int = 0,
                 sort: bool = True):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.background_label = background_label
        self.sort = sort

    def __call__(self, labels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for lab in labels:
            positive = torch.where((lab != -1) & (lab != self.background_label))[0]
            negative = torch.where(lab == self.background_label)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            out.append((pos.sort()[0], neg.sort()[0]) if self.sort else (pos, neg))
        return out
