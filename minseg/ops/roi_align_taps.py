"""RoIAlign's sample geometry, shared by the forward (ops/roi_align.py) and the backward (ops/roi_align_backward.py):
where each bin's bilinear samples fall, and which 4 pixels (taps) with which weights each sample reads.

The rules are torchvision's CPU kernel's (torchvision/csrc/ops/cpu/roi_align_kernel.cpp and roi_align_common.h):

- RoI in feature coordinates: start = x1 * scale - offset, with offset 0.5 when `aligned` (pixel centres at
  .5) and 0 otherwise; without `aligned` a RoI is at least 1x1.
- Each of the P bins per axis holds g samples at start + p * bin + (i + .5) * bin / g, where g is
  `sampling_ratio`, or ceil(roi_size / P) per RoI and per axis when sampling_ratio <= 0 (adaptive).
- A sample outside [-1, size] (on either axis) has weight 0 and reads pixel (0, 0); one in [-1, 0] reads
  row 0; one past size - 1 reads the last row.

Positions are computed in the kernel's float order, so the taps and weights are bitwise the kernel's. Features
are addressed as rows of a channels-last table (ops/feature_table.py): pixel (y, x) of a RoI's map is row
base + y * width + x.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minseg.ops.forms import device_scalar


def bilinear_taps(pos: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sample positions along one axis -> (lo, hi) int64 rows, (w_lo, w_hi) weights (0 where invalid), valid.

    pos: float Tensor[...]; size: Tensor broadcastable to pos (the feature size on this axis).
    roi_align_common.h: invalid outside [-1, size]; clamp below at 0; at or past size - 1 read size - 1 only;
    w_lo = 1 - frac, w_hi = frac, as the kernel's hy = 1 - ly, ly.
    """
    valid = (pos >= -1.0) & (pos <= size)  # NaN positions are invalid, as in the kernel
    pos = torch.where(valid, pos.clamp(min=0), 0.0)
    last = (size - 1).to(pos.dtype)
    lo = pos.floor()
    at_edge = lo >= last
    lo = torch.where(at_edge, last, lo)
    pos = torch.where(at_edge, lo, pos)
    frac = pos - lo
    w_hi = torch.where(valid, frac, 0.0)
    w_lo = torch.where(valid, 1 - frac, 0.0)
    lo = lo.long()
    hi = torch.where(at_edge, lo, lo + 1)
    return lo, hi, w_lo, w_hi, valid


def sample_taps(base: Tensor, width: Tensor, y: tuple[Tensor, ...],
                x: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-axis taps of samples (broadcast together) -> table rows and weights Tensor[..., 4] in w1..w4 order,
    and which samples are valid, Bool Tensor[...].

    y, x: `bilinear_taps` results; base, width: broadcastable int64. (w1, w2, w3, w4) = (hy*hx, hy*lx, ly*hx,
    ly*lx) at (lo, lo), (lo, hi), (hi, lo), (hi, hi); a sample invalid on either axis reads pixel (0, 0).
    """
    ylo, yhi, wylo, wyhi, yvalid = y
    xlo, xhi, wxlo, wxhi, xvalid = x
    valid = yvalid & xvalid
    rows = torch.stack((ylo, ylo, yhi, yhi), dim=-1) * width[..., None] + torch.stack((xlo, xhi, xlo, xhi), dim=-1)
    idx = base[..., None] + torch.where(valid[..., None], rows, 0)  # (..., 4)
    wts = torch.stack((wylo, wylo, wyhi, wyhi), dim=-1) * torch.stack((wxlo, wxhi, wxlo, wxhi), dim=-1)
    return idx, wts, valid


def roi_geometry(rois: Tensor, scale: Tensor, P: tuple[int, int], aligned: bool) -> tuple[Tensor, ...]:
    """Per-RoI start and bin size along y and x, and the RoI sizes, in the kernel's float order."""
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    x2 = rois[:, 3] * scale - offset
    y2 = rois[:, 4] * scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # kept: malformed RoIs are forced to 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    return y1, x1, roi_h / device_scalar(P[0], roi_h), roi_w / device_scalar(P[1], roi_w), roi_h, roi_w


def sample_positions(start: Tensor, bin_size: Tensor, grid: Tensor, p: Tensor, i: Tensor) -> Tensor:
    """start + p * bin + ((i + .5) * bin) / grid, evaluated left to right as in the kernel."""
    return (start + p * bin_size) + ((i + 0.5) * bin_size) / grid


def fixed_taps(rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor, P: tuple[int, int],
               g: int, aligned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed g x g samples per bin: table rows and weights Tensor[K, Ph, Pw, g*g, 4] of every tap, and valid
    Bool Tensor[K, Ph, Pw, g*g], in the kernel's order (RoI, bin row, bin column, sample row, sample column)."""
    K = rois.shape[0]
    Ph, Pw = P
    y1, x1, bin_h, bin_w, _, _ = roi_geometry(rois, scale, P, aligned)
    dtype, device = y1.dtype, y1.device
    # both axes in one pass, y then x, over max(Ph, Pw) bins (elementwise: each value as if computed alone):
    # one set of temporaries, not two, and at 1024 RoIs of 7x7 large enough that malloc maps and unmaps them
    # instead of leaving ~0.4 MB of touched heap pages resident for the rest of the step
    Pm = max(Ph, Pw)
    start, bin_size = torch.stack((y1, x1))[:, :, None, None], torch.stack((bin_h, bin_w))[:, :, None, None]
    pos = sample_positions(start, bin_size, torch.full((), g, dtype=dtype, device=device),
                           torch.arange(Pm, dtype=dtype, device=device)[:, None],
                           torch.arange(g, dtype=dtype, device=device))                 # (2, K, Pm, g)
    taps = bilinear_taps(pos, torch.stack((height, width)).to(dtype)[:, :, None, None])
    ty = [t[0, :, :Ph, None, :, None] for t in taps]  # (K, Ph, 1, g, 1)
    tx = [t[1, :, None, :Pw, None, :] for t in taps]  # (K, 1, Pw, 1, g)
    idx, wts, valid = sample_taps(base[:, None, None, None, None], width[:, None, None, None, None], ty, tx)
    return idx.reshape(K, Ph, Pw, g * g, 4), wts.reshape(K, Ph, Pw, g * g, 4), valid.reshape(K, Ph, Pw, g * g)


def segment_arange(counts: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For counts Tensor[K]: (owner, local) of length total, owner = k repeated counts[k] times, local = 0.."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=counts.device) - first[owner]
    return owner, local


def adaptive_grid(rois: Tensor, scale: Tensor, P: tuple[int, int], aligned: bool) -> tuple[Tensor, Tensor]:
    """Samples per bin along y and x of each RoI, ceil(roi_size / P) = ceil(bin size): Tensor[K] int64 each
    (0 when aligned and the RoI is empty)."""
    _, _, bin_h, bin_w, _, _ = roi_geometry(rois, scale, P, aligned)
    return torch.ceil(bin_h).long().clamp(min=0), torch.ceil(bin_w).long().clamp(min=0)


def adaptive_taps(rois: Tensor, base: Tensor, height: Tensor, width: Tensor, scale: Tensor, P: tuple[int, int],
                  aligned: bool, grid: tuple[Tensor, Tensor],
                  grid_host: tuple[list[int], list[int]]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-RoI grid (gh, gw) = ceil(roi_size / P) per axis (`adaptive_grid`, on the device and on the host: the
    shapes depend on it). Every sample (k, ph, pw, iy, ix) in the kernel's order: table rows and weights
    Tensor[S, 4], valid Bool Tensor[S], its bin k*Ph*Pw + ph*Pw + pw and its slot iy*gw + ix, Tensor[S] int64."""
    Ph, Pw = P
    y1, x1, bin_h, bin_w, _, _ = roi_geometry(rois, scale, P, aligned)
    (gh, gw), (gh_host, gw_host) = grid, grid_host
    n_host = [a * b for a, b in zip(gh_host, gw_host)]  # samples per bin of each RoI
    Sy, Sx, S = Ph * sum(gh_host), Pw * sum(gw_host), Ph * Pw * sum(n_host)
    dtype = y1.dtype
    ny, nx = Ph * gh, Pw * gw  # samples per RoI along y and x
    # samples along y: entries (k, ph, iy), and along x: (k, pw, ix)
    ky, local = segment_arange(ny, Sy)
    ph = torch.div(local, gh[ky], rounding_mode="floor")
    py = sample_positions(y1[ky], bin_h[ky], gh[ky].to(dtype), ph.to(dtype), (local - ph * gh[ky]).to(dtype))
    ty = bilinear_taps(py, height[ky].to(dtype))
    kx, local = segment_arange(nx, Sx)
    pw = torch.div(local, gw[kx], rounding_mode="floor")
    px = sample_positions(x1[kx], bin_w[kx], gw[kx].to(dtype), pw.to(dtype), (local - pw * gw[kx]).to(dtype))
    tx = bilinear_taps(px, width[kx].to(dtype))
    # every sample (k, ph, pw, iy, ix), in the kernel's order, points into the two lists
    k, local = segment_arange(ny * nx, S)
    g_h, g_w = gh[k], gw[k]
    ix = local % g_w
    rest = torch.div(local, g_w, rounding_mode="floor")
    iy = rest % g_h
    rest = torch.div(rest, g_h, rounding_mode="floor")
    pw, ph = rest % Pw, torch.div(rest, Pw, rounding_mode="floor")
    yi = (torch.cumsum(ny, 0) - ny)[k] + ph * g_h + iy
    xi = (torch.cumsum(nx, 0) - nx)[k] + pw * g_w + ix
    idx, wts, valid = sample_taps(base[k], width[k], [t[yi] for t in ty], [t[xi] for t in tx])  # (S, 4)
    return idx, wts, valid, k * (Ph * Pw) + ph * Pw + pw, iy * g_w + ix


def adaptive_chunks(gh_host: list[int], gw_host: list[int], P: tuple[int, int],
                    max_entries: int) -> list[tuple[int, int]]:
    """Split RoIs, given their grids, into runs of at most `max_entries` sample taps."""
    chunks, start, used = [], 0, 0
    for k, (a, b) in enumerate(zip(gh_host, gw_host)):
        n = 4 * P[0] * P[1] * a * b  # taps of RoI k
        if k > start and used + n > max_entries:
            chunks.append((start, k))
            start, used = k, 0
        used += n
    return chunks + [(start, len(gh_host))]
