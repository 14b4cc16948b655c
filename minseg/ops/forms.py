"""One switch for the ops whose fastest form differs by device.

On the CPU, ops follow the originals' CPU kernels' float order (bitwise parity) and size their steps to stay
within the caches. On GPUs a kernel launch costs more than the arithmetic it starts, so the same ops take
fewer, larger steps: RoIAlign sums each bin in one fused gather and weighted sum (in the GPU's own order, as
torchvision's CUDA kernel is not bitwise its CPU kernel either), NMS decides up to 4096 boxes per block,
detectron2-style mask pasting computes fewer, more padded groups, and panoptic fusion decides all instances
in a few dense steps. Results agree to float32 rounding (NMS, pasting and fusion: exactly).
Tests and `minseg_ref.dispatch_count` replace `launch_bound` to run the GPU forms on the CPU.
`device_scalar` and `host_values` bring constants to a GPU without a synchronisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def launch_bound(t: Tensor) -> bool:
    """True where `t` lives, ops should take few large steps (GPUs); False on the CPU."""
    return t.device.type != "cpu"


def device_scalar(value: float, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`value` as a 0-dim tensor on `like`'s device (in `like`'s dtype unless given), made by a fill there: no
    host-to-device copy. Divide by it rather than by a Python number: CUDA divides by a Python number as a
    multiplication by its reciprocal (not correctly rounded), which moves RoIAlign's bin sizes by an ulp."""
    return torch.full((), value, dtype=dtype or like.dtype, device=like.device)


def host_values(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A few host numbers as Tensor[len(values)] on `device`, copied without waiting for the device: a blocking
    host-to-device copy (torch.tensor(values, device="cuda")) synchronises the stream, i.e. waits for all the
    work queued before it."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
