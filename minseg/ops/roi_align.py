"""RoIAlign (He et al., Mask R-CNN 2017) in plain tensor ops: `roi_align`, its module, and `roi_align_table`
(every RoI reading its own map out of one channels-last table: what the FPN pooler, ops/poolers.py, runs on).

Each output bin of a RoI is the mean of a grid of bilinearly interpolated samples. We follow torchvision's
CPU kernel (torchvision/csrc/ops/cpu/roi_align_kernel.cpp and roi_align_common.h) rule for rule: where the
samples fall and which pixels they read is ops/roi_align_taps.py; the bin value is the sum over samples
divided by max(g_h * g_w, 1).

The float order is the kernel's too, so float32 results are bitwise equal to torchvision's CPU op: a sample's
value is w1*v1 + w2*v2 + w3*v3 + w4*v4 (each product rounded, summed left to right), and a bin adds its
samples to a running sum from 0 in (iy, ix) order, then divides by the count. With features stored
channels-last as a table of rows `(N*H*W, C)`, a group of bins takes: one `F.embedding_bag` with bags of one
row for all 4 products of all its samples (w * v + 0: one rounding each; longer bags would fuse
multiply-adds), three adds for the sample values, then one add per sample slot into the running sums. No
reduction kernel is used: those reorder. Groups are sized so their products stay in the CPU caches. In the
adaptive case bins are sorted by sample count, so slot j is an add over a prefix of a group's bins and no bin
adds padding. With sampling_ratio > 0 shapes depend only on K, P and g: no host-device synchronisation; the
adaptive case reads its sample counts to the host, once per call (shapes depend on them); exported, it reads
nothing and loops over the sample slots of the largest grid instead (`_pool_adaptive_traced`, the same sums).

The "gpu" form (`impl`, see ops/forms.py; the default on GPUs) sends the same taps through one
`F.embedding_bag` in "sum" mode with a bag of taps per bin: a fused gather and weighted sum, in the GPU's own
order (as torchvision's CUDA kernel is not bitwise its CPU kernel). The plain math is
`minseg.ops.reference.roi_align`.

Backward (`_RoIAlignFunction`): ops/roi_align_backward.py, bitwise torchvision's CPU backward, none into the
boxes, and twice differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

from minseg.ops import forms, reference
from minseg.ops.feature_table import compute_dtype, feature_table
from minseg.ops.forms import device_scalar
from minseg.ops.roi_align_backward import pool_grad
from minseg.ops.roi_align_taps import (adaptive_chunks, adaptive_grid, adaptive_taps, bilinear_taps, fixed_taps,
                                       roi_geometry, sample_positions, sample_taps)

_MAX_ENTRIES = 1 << 21  # sample taps per run of RoIs (bounds the index/weight temporaries)
_MAX_ENTRIES_GPU = 1 << 24  # on GPUs each run costs ~100 kernel launches: fewer, larger runs (~200 MB of taps)
_MAX_VALUES = 1 << 22  # products per group of bins: taps * C (Tensor[4, S, C], kept within the CPU caches)


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def boxes_to_rois(boxes: Tensor | list[Tensor]) -> Tensor:
    """A list of per-image Tensor[L_i, 4] -> Tensor[K, 5] (batch index, x1, y1, x2, y2); Tensor[K, 5] passes."""
    if isinstance(boxes, Tensor):
        return boxes
    concat = torch.cat(boxes, dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)  # (K, 1)
    return torch.cat([ids, concat], dim=1)


def _sum_samples(table: Tensor, idx: Tensor, wts: Tensor, active: list[int]) -> Tensor:
    """Per bin, 0 + sample_0 + sample_1 + ... in that order. Returns Tensor[active[0], C] (sums, not divided).

    idx, wts: Tensor[4, S] taps (w1..w4) of all samples, slot-major: the active[0] bins' sample 0, then the
    active[1] leading bins' sample 1, ... A product w * v is one rounding (embedding_bag's w * v + 0 with
    bags of one row), a sample's value adds its 4 products left to right.
    """
    C = table.shape[1]
    if torch.compiler.is_compiling():  # exported: the same products as a gather (ONNX loops over embedding bags)
        p = table[idx.reshape(-1)] * wts.reshape(-1, 1)  # (4*S, C); -0.0 products become +0.0 below (acc += 0.0)
    else:
        p = F.embedding_bag(idx.reshape(-1, 1), table, per_sample_weights=wts.reshape(-1, 1), mode="sum")  # (4*S, C)
    p = p.view(4, -1, C)
    val = p[0]  # (S, C) sample values, summed in place
    val += p[1]
    val += p[2]
    val += p[3]
    acc = val[:active[0]]
    acc += 0.0  # the kernel's 0 + sample_0 (turns -0.0 into +0.0)
    start = active[0]
    for m in active[1:]:
        acc[:m].add_(val[start:start + m])  # (not `acc[:m] += ...`: Python would then copy the slice onto itself)
        start += m
    return acc


def _pool_fixed(table: Tensor, rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor,
                P: tuple[int, int], g: int, aligned: bool, fused: bool) -> Tensor:
    """Fixed g x g samples per bin. Returns Tensor[K*Ph*Pw, C] bin sums divided by g*g."""
    idx, wts, _ = fixed_taps(rois, base, height, width, scale, P, g, aligned)  # (K, Ph, Pw, G, 4)
    M, G, C = rois.shape[0] * P[0] * P[1], g * g, table.shape[1]
    if fused:  # one bag of G * 4 taps per bin
        sums = F.embedding_bag(idx.reshape(M, G * 4), table, per_sample_weights=wts.reshape(M, G * 4), mode="sum")
        return sums.div_(device_scalar(max(G, 1), sums))
    idx = idx.permute(4, 3, 0, 1, 2).reshape(4, G, M)  # (tap, slot (iy, ix), bin (k, ph, pw))
    wts = wts.permute(4, 3, 0, 1, 2).reshape(4, G, M)
    B = max(1, _MAX_VALUES // (4 * G * C))  # bins per group: the group's products stay in cache
    traced = torch.compiler.is_compiling()  # exported: M is a data-dependent size, one group (the same sums)
    if traced:
        B = M
    sums = table.new_empty((M, C))  # filled group by group: a group's sums are a view into its products
    for b in ([0] if traced else range(0, M, B)):
        sums[b:b + B] = _sum_samples(table, idx[:, :, b:b + B].reshape(4, -1), wts[:, :, b:b + B].reshape(4, -1),
                                     [min(B, M - b)] * G)
    return sums.div_(device_scalar(max(G, 1), sums))


def _pool_adaptive(table: Tensor, rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor,
                   P: tuple[int, int], aligned: bool, grid: tuple[Tensor, Tensor],
                   grid_host: tuple[list[int], list[int]], fused: bool) -> Tensor:
    """Per-RoI grid ceil(roi_size / P) per axis (`adaptive_taps`). Returns Tensor[K*Ph*Pw, C] bin sums divided
    by the count."""
    K = rois.shape[0]
    Ph, Pw = P
    gh, gw = grid
    n_host = [a * b for a, b in zip(*grid_host)]  # samples per bin of each RoI
    idx, wts, _, bin_of, slot = adaptive_taps(rois, base, height, width, scale, P, aligned, grid, grid_host)
    # bins sorted by sample count, descending, then cut into groups whose products stay in cache; within a
    # group samples go slot-major (slot j of every bin that has one, then slot j + 1), so the bins with a
    # slot j are a prefix of the group
    M, PP, C = K * Ph * Pw, Ph * Pw, table.shape[1]
    n = gh * gw
    if fused:  # samples are bin by bin already: one bag per bin, empty bins sum to 0
        per_bin = n.repeat_interleave(PP)  # (M,)
        offsets = (torch.cumsum(per_bin, 0) - per_bin) * 4
        sums = F.embedding_bag(idx.reshape(-1), table, offsets, mode="sum", per_sample_weights=wts.reshape(-1))
        return sums / per_bin.clamp(min=1).to(table.dtype)[:, None]
    order = torch.sort(n, descending=True, stable=True).indices
    bins = (order[:, None] * PP + torch.arange(PP, device=n.device)).reshape(-1)  # (M,) in sorted order
    rank = torch.empty_like(bins).index_copy_(0, bins, torch.arange(M, device=n.device))
    # the sorted non-empty bins as runs [samples per bin, bins] (a list entry per bin would be K*Ph*Pw Python
    # objects: ~0.2 MB of interpreter memory at 28x28 mask targets), cut into groups of runs
    runs = []
    for c in sorted(n_host, reverse=True):
        if c == 0:
            break
        if runs and runs[-1][0] == c:
            runs[-1][1] += PP
        else:
            runs.append([c, PP])
    if not runs:  # every RoI empty: all bins 0
        return table.new_zeros((M, C))
    groups, used = [[]], 0
    for c, left in runs:
        while left:  # as many bins as fit the group; a group takes at least one
            take = min(left, max(0 if groups[-1] else 1, (_MAX_VALUES - used) // (4 * c * C)))
            if take == 0:
                groups.append([])
                used = 0
                continue
            groups[-1].append((c, take))
            used, left = used + take * 4 * c * C, left - take
    run_len = torch.tensor([k for g in groups for _, k in g], device=n.device)
    b = rank[bin_of]  # each sample's bin, in sorted order
    group = torch.arange(len(groups), device=n.device).repeat_interleave(
        torch.tensor([len(g) for g in groups], device=n.device)).repeat_interleave(run_len)[b]
    slot_major = torch.argsort((group * runs[0][0] + slot) * M + b)
    idx, wts = idx[slot_major].t(), wts[slot_major].t()  # (4, S)
    n_sorted = sum(k for _, k in runs)
    sums, start, row = table.new_empty((n_sorted, C)), 0, 0  # filled group by group, as in _pool_fixed
    for g in groups:
        active = [sum(k for c, k in g if c > j) for j in range(g[0][0])]  # bins with a slot j
        bins_g, samples_g = sum(k for _, k in g), sum(c * k for c, k in g)
        sums[row:row + bins_g] = _sum_samples(table, idx[:, start:start + samples_g], wts[:, start:start + samples_g],
                                              active)
        start, row = start + samples_g, row + bins_g
    count = torch.tensor([c for g in groups for c, _ in g], dtype=table.dtype, device=table.device)
    count = count.repeat_interleave(run_len)[:, None]
    return table.new_zeros((M, C)).index_copy_(0, bins[:n_sorted], sums.div_(count))  # RoI order


def _pool_adaptive_traced(table: Tensor, rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor,
                          P: tuple[int, int], aligned: bool) -> Tensor:
    """`_pool_adaptive` with no host read, for exported graphs: a torch.while_loop (an ONNX Loop) over the sample
    slots (iy, ix) of the largest grid, row by row, every bin adding its sample at that slot to its running sum;
    a slot outside a RoI's own grid adds a zero-weight sample (+-0.0, which leaves the sum unchanged). Each bin
    thus adds its own samples from 0 in the kernel's (iy, ix) order: the same sums, then divided by the count.
    Returns Tensor[K*Ph*Pw, C]."""
    K, C = rois.shape[0], table.shape[1]
    Ph, Pw = P
    y1, x1, bin_h, bin_w, _, _ = roi_geometry(rois, scale, P, aligned)
    gh, gw = adaptive_grid(rois, scale, P, aligned)
    dtype = y1.dtype
    GH, GW = (torch.cat((g, g.new_zeros(1))).amax(0) for g in (gh, gw))  # 0 when there are no RoIs
    ph = torch.arange(Ph, dtype=dtype, device=rois.device)[None, :]
    pw = torch.arange(Pw, dtype=dtype, device=rois.device)[None, :]

    def body(j: Tensor, acc: Tensor) -> tuple[Tensor, Tensor]:
        iy, ix = torch.div(j, GW, rounding_mode="floor"), j % GW
        py = sample_positions(y1[:, None], bin_h[:, None], gh.to(dtype)[:, None], ph, iy.to(dtype))  # (K, Ph)
        px = sample_positions(x1[:, None], bin_w[:, None], gw.to(dtype)[:, None], pw, ix.to(dtype))  # (K, Pw)
        ty = [t[:, :, None] for t in bilinear_taps(py, height.to(dtype)[:, None])]  # (K, Ph, 1)
        tx = [t[:, None, :] for t in bilinear_taps(px, width.to(dtype)[:, None])]  # (K, 1, Pw)
        idx, wts, _ = sample_taps(base[:, None, None], width[:, None, None], ty, tx)  # (K, Ph, Pw, 4)
        wts = torch.where(((iy < gh) & (ix < gw))[:, None, None, None], wts, 0.0)
        p = (table[idx.reshape(-1)] * wts.reshape(-1, 1)).view(-1, 4, C)  # (K*Ph*Pw, 4, C)
        return j + 1, acc + (((p[:, 0] + p[:, 1]) + p[:, 2]) + p[:, 3])

    start = (torch.zeros((), dtype=torch.int64, device=rois.device), table.new_zeros((K * Ph * Pw, C)))
    _, sums = torch.while_loop(lambda j, acc: j < GH * GW, body, start)
    count = (gh * gw).clamp(min=1).to(table.dtype).repeat_interleave(Ph * Pw)[:, None]  # (K*Ph*Pw, 1)
    return sums / count


def _pool(table: Tensor, rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor,
          P: tuple[int, int], sampling_ratio: int, aligned: bool, fused: bool) -> Tensor:
    """RoIAlign over a channels-last table of rows. Returns Tensor[K, C, Ph, Pw]. `fused`: the "gpu" form.

    table: Tensor[R, C]; rois: Tensor[K, 5]; base: Tensor[K] int64, the table row of pixel (0, 0) of each
    RoI's feature map; height, width: Tensor[K] int64 sizes of that map; scale: Tensor[K] spatial scales.
    """
    K, C = rois.shape[0], table.shape[1]
    Ph, Pw = P
    if guard_or_false(K * C * Ph * Pw == 0):  # nothing to pool (unknown when exported: the general path copes)
        return table.new_zeros((K, C, Ph, Pw))
    max_entries = _MAX_ENTRIES_GPU if fused else _MAX_ENTRIES
    if sampling_ratio > 0:
        step = max(1, max_entries // (Ph * Pw * 4 * sampling_ratio**2))
        traced = torch.compiler.is_compiling()  # exported: K is a data-dependent size, one run (the same values)
        if traced:
            step = K
        out = torch.cat([_pool_fixed(table, rois[s:s + step], base[s:s + step], height[s:s + step],
                                     width[s:s + step], scale[s:s + step], P, sampling_ratio, aligned, fused)
                         for s in ([0] if traced else range(0, K, step))])
    elif torch.compiler.is_compiling():  # exported: no host read
        out = _pool_adaptive_traced(table, rois, base, height, width, scale, P, aligned)
    else:  # every RoI's grid read to the host once: chunks and shapes depend on it
        gh, gw = adaptive_grid(rois, scale, P, aligned)
        gh_host, gw_host = torch.stack((gh, gw)).tolist()
        out = torch.cat([_pool_adaptive(table, rois[s:e], base[s:e], height[s:e], width[s:e], scale[s:e], P, aligned,
                                        (gh[s:e], gw[s:e]), (gh_host[s:e], gw_host[s:e]), fused)
                         for s, e in adaptive_chunks(gh_host, gw_host, P, max_entries)])
    return out.view(K, Ph, Pw, C).permute(0, 3, 1, 2).contiguous()  # (K, C, Ph, Pw)


class _RoIAlignFunction(torch.autograd.Function):
    """`_pool` with torchvision's gradient: to the table only (none to the RoIs, as torchvision's kernel), and
    a backward built from differentiable ops (`pool_grad`), so double backward works."""

    @staticmethod
    def forward(ctx, table: Tensor, rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor,
                P: tuple[int, int], sampling_ratio: int, aligned: bool, fused: bool) -> Tensor:
        ctx.save_for_backward(rois, base, height, width, scale)
        ctx.rows, ctx.params = table.shape[0], (P, sampling_ratio, aligned)
        return _pool(table, rois, base, height, width, scale, P, sampling_ratio, aligned, fused)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_table = None
        if ctx.needs_input_grad[0]:
            grad_table = pool_grad(grad, ctx.rows, *ctx.saved_tensors, *ctx.params)
        return grad_table, None, None, None, None, None, None, None, None, None


def roi_align_table(table: Tensor, rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor,
                    output_size: int | tuple[int, int], sampling_ratio: int, aligned: bool, *,
                    impl: str = "auto") -> Tensor:
    """RoIAlign where each RoI reads its own feature map out of one channels-last table of pixel rows: how the
    multi-scale pooler (ops/poolers.py) pools all pyramid levels in one pass. Per RoI the result is
    `roi_align` on that RoI's map, bitwise.

    table: Tensor[R, C] float32/float64 (`feature_table`); rois: Tensor[K, 5] (batch index, x1, y1, x2, y2) in
    image coordinates, of the table's dtype; base: Tensor[K] int64, the table row of pixel (0, 0) of the RoI's
    map (its image included); height, width: Tensor[K] int64, that map's size; scale: Tensor[K], its spatial
    scale. impl: "auto", "cpu" or "gpu", as roi_align's. Returns Tensor[K, C, Ph, Pw].
    Differentiable with respect to `table` (torchvision's backward, twice differentiable), not the RoIs.
    """
    form = forms.choose(impl, table)
    if form == "reference":
        raise ValueError("roi_align_table has no reference form; use roi_align(impl='reference') per map")
    return _RoIAlignFunction.apply(table, rois, base, height, width, scale, _pair(output_size), sampling_ratio,
                                   aligned, form == "gpu")


def check_boxes(boxes: Tensor | list[Tensor]) -> None:
    """torchvision's check_roi_boxes_shape, with its exception type (AssertionError)."""
    if isinstance(boxes, (list, tuple)):
        for b in boxes:
            if b.size(1) != 4:
                raise AssertionError("The shape of the tensor in the boxes list is not correct as List[Tensor[L, 4]]")
    elif isinstance(boxes, Tensor):
        if boxes.size(1) != 5:
            raise AssertionError("The boxes tensor shape is not correct as Tensor[K, 5]")
    else:
        raise AssertionError("boxes is expected to be a Tensor[L, 5] or a List[Tensor[K, 4]]")


def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False, *,
              impl: str = "auto") -> Tensor:
    """RoIAlign, a drop-in for torchvision.ops.roi_align.

    input: Tensor[N, C, H, W]; boxes: Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of N Tensor[L_i, 4],
    in image coordinates that `spatial_scale` maps onto the feature map, of the input's dtype. Returns
    Tensor[K, C, Ph, Pw]. float16/bfloat16 inputs are computed in float32 and rounded once at the end
    (torchvision's CPU kernel rounds every step in half precision).
    impl: "auto", "cpu", "gpu" or "reference" (ops/forms.py). The "cpu" form is bitwise equal to
    `minseg.ops.reference.roi_align` and to torchvision's CPU kernel; the "gpu" form equals them to float32
    rounding.
    Gradients, as torchvision's: to `input` only (bitwise torchvision's CPU backward in the "cpu" form; a
    model that does not detach its boxes trains the same), and twice differentiable (torchvision's kernel is
    not). Malformed arguments raise torchvision's exception types.
    """
    check_boxes(boxes)
    rois = boxes_to_rois(boxes)
    if input.dim() != 4 or not input.is_floating_point():
        raise RuntimeError(f"roi_align expects a floating point Tensor[N, C, H, W], got {input.dim()}-d {input.dtype}")
    if rois.dtype != input.dtype:
        raise RuntimeError(f"roi_align expects boxes of the input's dtype {input.dtype}, got {rois.dtype}")
    form = forms.choose(impl, input)
    if form == "reference":
        return reference.roi_align(input, rois.detach(), _pair(output_size), spatial_scale, sampling_ratio, aligned)
    N, C, H, W = input.shape
    dtype = compute_dtype(input.dtype)
    rois = rois.to(dtype)
    K = rois.shape[0]
    device = input.device
    base = rois[:, 0].detach().long() * (H * W)  # kept: the batch index is truncated like the kernel's int cast
    height = torch.full((K,), H, dtype=torch.int64, device=device)
    width = torch.full((K,), W, dtype=torch.int64, device=device)
    scale = torch.full((K,), spatial_scale, dtype=dtype, device=device)
    out = roi_align_table(feature_table([input], dtype), rois, base, height, width, scale, output_size,
                          sampling_ratio, aligned, impl=form)
    return out.to(input.dtype)


class RoIAlign(nn.Module):
    """Module form of `roi_align`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")

