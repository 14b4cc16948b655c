"""RoIAlign's backward, bitwise torchvision's CPU backward (cpu/roi_align_kernel.cpp, roi_align_backward_kernel_impl).

Each tap of each sample adds grad(bin) * w / count to its pixel, visiting RoIs, bins, samples and taps in the
forward's order (one `index_add_` per step, which adds rows in order), so every pixel receives its terms in the
kernel's order. None flows into the boxes, as in torchvision. Only differentiable tensor ops are used, so the
backward has a backward of its own (roi_align is twice differentiable; torchvision's kernel is not).
The taps are the forward's (ops/roi_align_taps.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from minseg.ops.roi_align_taps import adaptive_chunks, adaptive_grid, adaptive_taps, fixed_taps

_MAX_ENTRIES = 1 << 21  # sample taps per run of RoIs (bounds the index/weight temporaries)
_MAX_VALUES = 1 << 22  # gradient terms per step: taps * C (Tensor[T, C])


def _add_taps(grad_table: Tensor, grad_bins: Tensor, idx: Tensor, wts: Tensor, valid: Tensor, bins: Tensor,
              count: Tensor) -> None:
    """grad_table[idx[t]] += grad_bins[bins[t]] * wts[t] / count[bins[t]] for every tap t, in order (in place).

    idx, wts, valid, bins: Tensor[T] per tap; count: Tensor[M] samples per bin. One rounding for the product and
    one for the division, as torchvision's `grad_output_this_bin * w1 / count`; invalid samples add nothing (the
    kernel skips them). index_add_ on the CPU adds its rows one after the other, so each element of the table
    receives its terms in tap order. Steps of _MAX_VALUES // C taps bound the Tensor[T, C] of terms.
    """
    step = max(1, _MAX_VALUES // max(1, grad_bins.shape[1]))
    for s in range(0, idx.numel(), step):
        b = bins[s:s + step]
        terms = grad_bins[b] * wts[s:s + step, None] / count[b, None]  # (T, C)
        grad_table.index_add_(0, idx[s:s + step], torch.where(valid[s:s + step, None], terms, 0.0))


def pool_grad(grad: Tensor, rows: int, rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor,
              P: tuple[int, int], sampling_ratio: int, aligned: bool) -> Tensor:
    """The gradient of roi_align.py's `_pool` with respect to its table: grad Tensor[K, C, Ph, Pw] -> Tensor[rows, C].

    torchvision's roi_align_backward_kernel_impl (cpu/roi_align_kernel.cpp): every tap of every sample adds
    grad(bin) * w / count to its pixel, visiting RoIs, bins, samples and taps in the forward's order. Written in
    differentiable tensor ops only (gather, product, division, index_add_), so this backward has a backward:
    roi_align is twice differentiable. It is linear in `grad` and does not read the features.
    """
    K, C, Ph, Pw = grad.shape
    PP, device = Ph * Pw, grad.device
    grad_table = grad.new_zeros((rows, C))
    if grad.numel() == 0:
        return grad_table
    grad_bins = grad.permute(0, 2, 3, 1).reshape(K * PP, C)  # (K*Ph*Pw, C): bin (k, ph, pw) per row
    if sampling_ratio > 0:
        G = sampling_ratio**2
        step = max(1, _MAX_ENTRIES // (PP * 4 * G))
        count = torch.full((K * PP,), G, dtype=grad.dtype, device=device)
        for s in range(0, K, step):
            e = min(K, s + step)
            idx, wts, valid = fixed_taps(rois[s:e], base[s:e], height[s:e], width[s:e], scale[s:e], P,
                                         sampling_ratio, aligned)  # (k, Ph, Pw, G, 4)
            bins = torch.arange(s * PP, e * PP, device=device).repeat_interleave(4 * G)
            _add_taps(grad_table, grad_bins, idx.reshape(-1), wts.reshape(-1),
                      valid[..., None].expand(idx.shape).reshape(-1), bins, count)
    else:
        gh, gw = adaptive_grid(rois, scale, P, aligned)
        gh_host, gw_host = torch.stack((gh, gw)).tolist()
        count = (gh * gw).repeat_interleave(PP).clamp(min=1).to(grad.dtype)  # (K*Ph*Pw,)
        for s, e in adaptive_chunks(gh_host, gw_host, P, _MAX_ENTRIES):
            idx, wts, valid, bin_of, _ = adaptive_taps(rois[s:e], base[s:e], height[s:e], width[s:e], scale[s:e], P,
                                                       aligned, (gh[s:e], gw[s:e]), (gh_host[s:e], gw_host[s:e]))
            _add_taps(grad_table, grad_bins, idx.reshape(-1), wts.reshape(-1), valid.repeat_interleave(4),
                      (bin_of + s * PP).repeat_interleave(4), count)
    return grad_table
