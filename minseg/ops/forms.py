"""How an op picks its implementation, and small constants on the device without a synchronisation.

Ops whose fastest form differs by device, and every op that has a plain-math reference, take `impl`:
- "auto" (the default): the form tuned for the input's device ("cpu" on the CPU, "gpu" anywhere else);
- "cpu": the originals' CPU float order (bitwise parity) in steps sized for the CPU caches;
- "gpu": fewer, larger steps, since on GPUs a kernel launch costs more than the arithmetic it starts
  (RoIAlign sums each bin in one fused gather in its own order, as torchvision's CUDA kernel is not bitwise its
  CPU kernel either; NMS decides up to 4096 boxes per block; detectron2's paste computes fewer, more padded
  groups; panoptic fusion decides all instances in a few dense steps). Equal to "cpu" to float32 rounding
  (RoIAlign) or exactly (the others);
- "reference": the plain math of `minseg.ops.reference`, for reading and testing.
Either form runs on any device: tests run the "gpu" forms on the CPU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


IMPLS = ("auto", "cpu", "gpu", "reference")


def choose(impl: str, like: Tensor) -> str:
    """The form to run, "cpu", "gpu" or "reference": `impl`, with "auto" resolved by `like`'s device."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "auto":
        return "cpu" if like.device.type == "cpu" else "gpu"
    return impl


def device_scalar(value: float, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`value` as a 0-dim tensor on `like`'s device (in `like`'s dtype unless given), made by a fill there: no
    host-to-device copy. Divide by it rather than by a Python number: CUDA divides by a Python number as a
    multiplication by its reciprocal (not correctly rounded), which moves RoIAlign's bin sizes by an ulp."""
    return torch.full((), value, dtype=dtype or like.dtype, device=like.device)


def copy_to_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A few host numbers as Tensor[len(values)] on `device`, copied without waiting for the device: a blocking
    host-to-device copy (torch.tensor(values, device="cuda")) synchronises the stream, i.e. waits for all the
    work queued before it."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
