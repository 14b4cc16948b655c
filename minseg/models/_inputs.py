"""Checks on what a user hands to a model's forward: a clear error instead of a shape error deep inside a conv, or
detections computed from NaN. Shared by every family (batches for the dense models, lists for the detectors)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def check_finite(x: Tensor | Sequence[Tensor]) -> None:
    """ValueError if a floating-point tensor (a batch, or any image of a list) holds NaN or inf.

    One pass of isfinite over the input and a single host sync on CUDA, whatever the number of images. Skipped
    while torch.compile or torch.export traces: a branch on tensor values would break the graph (fullgraph=True),
    so a compiled or exported network does not check its input. Meta tensors (shape-only runs) have no values.
    """
    tensors = [x] if isinstance(x, Tensor) else list(x)
    floats = [(i, t) for i, t in enumerate(tensors) if t.is_floating_point() and not t.is_meta]
    if not floats or torch.compiler.is_compiling():
        return
    flags = [torch.isfinite(t).all() for _, t in floats]
    device = flags[0].device
    if bool(flags[0] if len(flags) == 1 else torch.stack([f.to(device) for f in flags]).all()):  # the one sync
        return
    i, t = next((i, t) for i, t in floats if not bool(torch.isfinite(t).all()))  # the error path: find the image
    what = "input" if isinstance(x, Tensor) else f"image {i}"
    bad = int((~torch.isfinite(t)).sum())
    raise ValueError(f"{what} contains NaN or inf values ({bad} of {t.numel()} elements): clean it first "
                     "(torch.nan_to_num) or check the preprocessing that produced it")


def check_images(x: Tensor, channels: int = 3) -> None:
    """Clear errors for a batch a network cannot take: not a Tensor[N, channels, H, W], not floating point,
    non-finite values."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a Tensor[N, {channels}, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"expected a Tensor[N, {channels}, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image tensor, got {x.dtype} (convert and normalise it first)")
    check_finite(x)


def check_image_list(images: Sequence[Tensor], what: str, uint8_ok: bool = False) -> None:
    """Clear errors for a detector's list of images: each must be `what` (a Tensor[3, H, W], e.g. "a Tensor[3, H, W]
    in 0..1"), floating point (or uint8 where `uint8_ok`), and no image may hold NaN or inf."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"expected a non-empty list of images, each {what}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            got = f"shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image {i} must be {what}, got {got}")
        if not (image.is_floating_point() or (uint8_ok and image.dtype == torch.uint8)):
            raise TypeError(f"image {i} must be {what}, got dtype {image.dtype}")
    check_finite(images)
