"""The feature table RoIAlign reads: feature maps Tensor[N, C, H, W] as one channels-last table of pixel rows,
so that every RoI, whatever its image and pyramid level, is pooled by one gather from one tensor."""
from __future__ import annotations

import torch
from torch import Tensor


def feature_table(features: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Feature maps Tensor[N, C, H_l, W_l] -> one channels-last table Tensor[sum_l N*H_l*W_l, C] of pixel rows.

    Level l's rows follow level l-1's; inside a level, row n*H*W + y*W + x holds pixel (y, x) of image n.
    One transposing copy per level into a preallocated table (a reshape then a cat would copy twice); a single
    channels-last map of the table's dtype is already a table, and is used as it is.
    """
    dtype = dtype or compute_dtype(features[0].dtype)
    C = features[0].shape[1]
    first = features[0]
    if len(features) == 1 and first.dtype == dtype and first.is_contiguous(memory_format=torch.channels_last):
        return first.permute(0, 2, 3, 1).reshape(-1, C)  # (N*H*W, C), a view
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        return _FeatureTable.apply(dtype, *features)
    return _copy_into_table(features, dtype)


def _copy_into_table(features: list[Tensor], dtype: torch.dtype) -> Tensor:
    C = features[0].shape[1]
    table = features[0].new_empty((sum(f.shape[0] * f.shape[2] * f.shape[3] for f in features), C), dtype=dtype)
    start = 0
    for f in features:
        N, _, H, W = f.shape
        rows = table[start:start + N * H * W].view(N, H, W, C)
        rows.copy_(f.permute(0, 2, 3, 1))  # (N, H, W, C): a plain copy when f is channels_last
        start += N * H * W
    return table


class _FeatureTable(torch.autograd.Function):
    """The table copy, handing each level its gradient back as a contiguous Tensor[N, C, H, W]: autograd
    through the copy would hand back channels-last views of the table's gradient, and a norm's backward (v2's
    FPN) then reduces in another order than the originals', whose RoIAlign returns contiguous gradients."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *features: Tensor) -> Tensor:
        ctx.shapes, ctx.dtypes = [f.shape for f in features], [f.dtype for f in features]
        return _copy_into_table(list(features), dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (R, C)
        grads, start = [], 0
        for (N, C, H, W), dtype in zip(ctx.shapes, ctx.dtypes):
            rows = grad[start:start + N * H * W].view(N, H, W, C)
            grads.append(rows.permute(0, 3, 1, 2).contiguous().to(dtype))            # (N, C, H, W)
            start += N * H * W
        return (None, *grads)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype RoIAlign computes in: float32 and float64 as they are, anything narrower in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
