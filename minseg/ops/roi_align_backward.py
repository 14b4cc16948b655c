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
_MAX_VALUES = 1 << 22  # gradient terms per step: taps * C (Tensor[T, C], 16 MB in float32)


def _add_taps(grad_table: Tensor, grad: Tensor, idx: Tensor, wts: Tensor, valid: Tensor, bins: Tensor, count: Tensor,
              steps: list[tuple[int, int, int]]) -> None:
    """grad_table[idx[t]] += grad(bins[t]) * wts[t] / count[bins[t]] for every tap t, in order (in place).

    grad_table: Tensor[R, C]; grad: Tensor[k, C, Ph, Pw] of a run of k RoIs; idx, wts, valid, bins: Tensor[T] per
    tap, RoI after RoI, the bins numbered r*Ph*Pw + ph*Pw + pw within the run; count: Tensor[k*Ph*Pw] samples per
    bin; steps: (first RoI, end RoI, taps) of each step (`_steps`). One rounding for the product and one for the
    division, as torchvision's `grad_output_this_bin * w1 / count`. index_add_ on the CPU adds its rows one after
    the other, so each element of the table receives its terms in tap order. The kernel skips invalid samples;
    here they read a zero gradient row and add +0.0, which changes no sum (a sum started at +0.0 is never -0.0),
    whatever the gradient holds (masking their terms would cost a pass over Tensor[T, C]).
    Memory: steps of whole RoIs, at most _MAX_VALUES // C taps each, take a channels-last copy of only those RoIs'
    gradient and compute their Tensor[T, C] of terms in place (one temporary).
    """
    k, C, Ph, Pw = grad.shape
    PP = Ph * Pw
    t0 = 0
    for r0, r1, taps in steps:
        t1 = t0 + taps
        M = (r1 - r0) * PP
        grad_bins = grad.new_zeros((M + 1, C))  # the bins of RoIs r0..r1-1, channels-last, then a zero row
        grad_bins[:M].view(r1 - r0, Ph, Pw, C).copy_(grad[r0:r1].permute(0, 2, 3, 1))
        b = bins[t0:t1] - r0 * PP
        terms = grad_bins.index_select(0, torch.where(valid[t0:t1], b, M))          # (T, C)
        terms.mul_(wts[t0:t1, None]).div_(count[r0 * PP:r1 * PP][b, None])
        grad_table.index_add_(0, idx[t0:t1], terms)
        t0 = t1


def _steps(grid_host: tuple[list[int], list[int]] | int, k: int, P: tuple[int, int],
           C: int) -> list[tuple[int, int, int]]:
    """`_add_taps`' steps over k RoIs: (first, end, taps) runs of at most _MAX_VALUES // C taps (at least one RoI).
    grid_host: each RoI's samples per bin along y and x, or g for a fixed g x g grid (then no per-RoI lists:
    at 1024 RoIs they were ~50 KB of interpreter memory)."""
    per_bin = 4 * P[0] * P[1]
    if isinstance(grid_host, int):
        n = per_bin * grid_host * grid_host
        step = max(1, _MAX_VALUES // C // n)
        return [(r, min(k, r + step), (min(k, r + step) - r) * n) for r in range(0, k, step)]
    gh, gw = grid_host
    return [(r0, r1, sum(per_bin * a * b for a, b in zip(gh[r0:r1], gw[r0:r1])))
            for r0, r1 in adaptive_chunks(gh, gw, P, max(1, _MAX_VALUES // C))]


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
    if sampling_ratio > 0:
        g = sampling_ratio
        step = max(1, _MAX_ENTRIES // (PP * 4 * g * g))
        count = torch.full((step * PP,), g * g, dtype=grad.dtype, device=device)
        for s in range(0, K, step):
            e = min(K, s + step)
            idx, wts, valid = fixed_taps(rois[s:e], base[s:e], height[s:e], width[s:e], scale[s:e], P,
                                         sampling_ratio, aligned)  # (k, Ph, Pw, g*g, 4)
            bins = torch.arange((e - s) * PP, device=device).repeat_interleave(4 * g * g)
            _add_taps(grad_table, grad[s:e], idx.reshape(-1), wts.reshape(-1),
                      valid[..., None].expand(idx.shape).reshape(-1), bins, count, _steps(g, e - s, P, C))
    else:
        gh, gw = adaptive_grid(rois, scale, P, aligned)
        gh_host, gw_host = torch.stack((gh, gw)).tolist()
        count = (gh * gw).repeat_interleave(PP).clamp(min=1).to(grad.dtype)  # (K*Ph*Pw,)
        for s, e in adaptive_chunks(gh_host, gw_host, P, _MAX_ENTRIES):
            idx, wts, valid, bin_of, _ = adaptive_taps(rois[s:e], base[s:e], height[s:e], width[s:e], scale[s:e], P,
                                                       aligned, (gh[s:e], gw[s:e]), (gh_host[s:e], gw_host[s:e]))
            steps = _steps((gh_host[s:e], gw_host[s:e]), e - s, P, C)
            _add_taps(grad_table, grad[s:e], idx.reshape(-1), wts.reshape(-1), valid.repeat_interleave(4),
                      bin_of.repeat_interleave(4), count[s * PP:e * PP], steps)
    return grad_table
