"""One switch for the ops whose fastest form differs by device.

On the CPU, ops follow the originals' CPU kernels' float order (bitwise parity) and size their steps to stay
within the caches. On GPUs a kernel launch costs more than the arithmetic it starts, so the same ops take
fewer, larger steps: RoIAlign sums each bin in one fused gather and weighted sum (in the GPU's own order, as
torchvision's CUDA kernel is not bitwise its CPU kernel either), NMS decides up to 4096 boxes per block, and
detectron2-style mask pasting computes fewer, more padded groups. Results agree to float32 rounding.
Tests and `minseg_ref.dispatch_count` replace `launch_bound` to run the GPU forms on the CPU.
"""
from __future__ import annotations

from torch import Tensor


def launch_bound(t: Tensor) -> bool:
    """True where `t` lives, ops should take few large steps (GPUs); False on the CPU."""
    return t.device.type != "cpu"
