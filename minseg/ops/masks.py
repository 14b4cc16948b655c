"""Pasting fixed-size instance masks (28x28 from the mask head) into full-image masks, as each original does.

torchvision (models/detection/roi_heads.py, paste_masks_in_image; Detectron1 style): pad the mask by one
pixel of zeros, grow the box by (M + 2) / M about its centre, truncate it to integers, bilinearly resize the
padded mask to the integer box size (F.interpolate, align_corners=False) and copy it into a zero image.
Returns soft masks Tensor[N, 1, H, W]. Here the resize and the copy are two batched matrix products per call
(every mask at once, nothing bigger than the output).

detectron2 (layers/mask_ops.py, paste_masks_in_image): sample the mask with grid_sample at the centres of
image pixels mapped into the float box, then threshold (>= 0.5). On CPU the original pastes one mask at a
time, sampling only the window [floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1) around its box
(everything else stays False). Returns Tensor[N, H, W] bool. Here masks are grouped by window size, each
group is sampled as one dense (k, h, w) block (padded to the group's largest window) and scattered into the
image; the number of steps depends on how varied the sizes are, not on the number of masks. Exported (no host
read), all masks are one group padded to the largest window (`_one_bucket`): the same values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from minseg.ops import forms, reference

# detectron2's paste computes groups of windows (`_buckets`):
_CHUNK_PIXELS = 1 << 22  # window pixels computed per step (bounds the temporaries)
_PAD_FACTOR = 1.5  # a group's padded pixels may exceed its real window pixels by this factor
# on GPUs a step costs kernel launches more than arithmetic: far fewer, more padded groups
_GPU_CHUNK_PIXELS = 1 << 24
_GPU_PAD_FACTOR = 16.0


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow Tensor[N, 4] xyxy boxes about their centres by `scale` (torchvision's expand_boxes)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def _resize_taps(out_pos: Tensor, out_size: Tensor, in_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear (align_corners=False) source taps of output positions, per mask output size.

    out_pos: Tensor[k, L] int64 output indices; out_size: Tensor[k, 1] int64. Returns i0, i1 (int64) and w0, w1
    (float32) as PyTorch's upsample kernel computes them: scale = in / out in float32, src = scale * (j + .5)
    - .5 (one fused multiply-add in the AVX2 kernel, reproduced in float64), clamped at 0; i0 = floor(src)
    capped at in - 1; lambda = src - i0 clamped to [0, 1].
    """
    scale = forms.device_scalar(float(in_size), out_pos, torch.float32) / out_size.float()
    src = (scale.double() * (out_pos.float() + 0.5).double() - 0.5).float().clamp(min=0)
    i0 = src.floor().clamp(max=in_size - 1)
    lam = (src - i0).clamp(0, 1)
    i0 = i0.long()
    return i0, i0 + (i0 < in_size - 1).long(), 1 - lam, lam


def _resize_matrix(start: Tensor, stop: Tensor, length: int, in_size: int) -> Tensor:
    """A bilinear resize and its placement in the image as one matrix per mask.

    Masks of `in_size` pixels along one axis are resized to stop - start pixels (at least 1, as torchvision's
    max(w, 1)) and placed on [start, stop) (Tensor[N] int64 each, empty when stop <= start) of an image axis of
    `length` pixels. Returns Tensor[N, length, in_size] float32 whose row p holds the weights of the source
    pixels for image pixel p (`_resize_taps`: at most two non-zero); rows outside [start, stop) are zero.
    Where both taps are the last source pixel their weights are summed, which matters only for unpadded masks
    (the padded mask's last pixel is zero).
    """
    pos = torch.arange(length, device=start.device) - start[:, None]  # (N, length) position in the resized mask
    extent = (stop - start)[:, None]
    i0, i1, w0, w1 = _resize_taps(pos, extent.clamp(min=1), in_size)
    outside = (pos < 0) | (pos >= extent)
    matrix = torch.zeros(*pos.shape, in_size, device=start.device)
    matrix.scatter_add_(2, i0[..., None], w0.masked_fill(outside, 0)[..., None])
    matrix.scatter_add_(2, i1[..., None], w1.masked_fill(outside, 0)[..., None])
    return matrix


def paste_masks_torchvision(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1, *,
                            impl: str = "auto") -> Tensor:
    """torchvision's paste_masks_in_image.

    masks: Tensor[N, 1, M, M] soft masks; boxes: Tensor[N, 4] xyxy in image pixels; image_shape: (H, W).
    Returns Tensor[N, 1, H, W] in the masks' dtype, zero outside each (expanded, integer) box.
    The separable resize is two batched matrix products, rows @ mask @ columns^T, whose factors hold the
    bilinear weights of the image pixels (`_resize_matrix`; zero outside the box): all masks in two calls,
    with nothing bigger than the output. Each sum has the same two non-zero products as PyTorch's upsample
    kernel, which fuses multiply-adds differently by code path: values agree with torchvision's to 2 float32
    ulps, not bitwise. The products run in float64 (then round once to float32): no TF32, bfloat16 or autocast
    shortcut applies to them, whatever the process-wide settings. impl: "auto", "cpu", "gpu" (one form) or
    "reference" (`minseg.ops.reference.paste_masks_torchvision`, one mask at a time; bitwise torchvision's).
    """
    if forms.choose(impl, masks) == "reference":
        return reference.paste_masks_torchvision(masks, boxes, image_shape, padding)
    N, _, M, _ = masks.shape
    H, W = image_shape
    if guard_or_false(N == 0):  # (unknown when exported: the general path pastes no masks too)
        return masks.new_zeros(0, 1, H, W)
    padded = F.pad(masks, (padding,) * 4)[:, 0].double()  # (N, Mp, Mp)
    Mp = padded.shape[-1]
    box = expand_boxes(boxes, float(M + 2 * padding) / M).to(torch.int64)  # kept: truncation, as the int cast
    x0, y0, x1, y1 = box.unbind(1)
    # the mask resized to (y1 - y0 + 1) x (x1 - x0 + 1) covers [y0, y1] x [x0, x1] (nothing for inverted boxes)
    rows = _resize_matrix(y0, y1 + 1, H, Mp)  # (N, H, Mp)
    columns = _resize_matrix(x0, x1 + 1, W, Mp)  # (N, W, Mp)
    with torch.autocast(masks.device.type, enabled=False):  # (autocast is per thread: no global state changes)
        along_x = torch.bmm(padded, columns.transpose(1, 2).double())  # (N, Mp, W): along x on every source row
        pasted = torch.bmm(rows.double(), along_x)  # (N, H, W): then along y
    return pasted.to(masks.dtype)[:, None]


def _buckets(windows: Tensor, padded: bool):
    """Group masks by window size and yield, per group, the image rows and columns of their windows.

    windows: Tensor[N, 4] int64 (x0, y0, x1, y1), end exclusive. Yields (n Tensor[k], ys Tensor[k, h],
    xs Tensor[k, w], inside Tensor[k, h, w] bool) where h, w are the group's largest window sides and
    `inside` marks the pixels of each mask's own window. Masks in a group have similar sizes, so padding
    stays small (with `padded`, the "gpu" form, groups are fewer and padded more); empty windows are skipped. One host read of the
    window sizes. The grouping changes no value, only how many pixels each step computes.
    """
    pad_factor, chunk = (_GPU_PAD_FACTOR, _GPU_CHUNK_PIXELS) if padded else (_PAD_FACTOR, _CHUNK_PIXELS)
    sizes = (windows[:, 2:] - windows[:, :2]).clamp(min=0)  # (N, 2) w, h
    ws, hs = sizes[:, 0].tolist(), sizes[:, 1].tolist()
    order = sorted((i for i in range(len(ws)) if ws[i] * hs[i] > 0), key=lambda i: -ws[i] * hs[i])
    start = 0
    while start < len(order):
        w, h, area, stop = ws[order[start]], hs[order[start]], ws[order[start]] * hs[order[start]], start + 1
        while stop < len(order):
            i = order[stop]
            nw, nh = max(w, ws[i]), max(h, hs[i])
            if (stop - start + 1) * nw * nh > max(pad_factor * (area + ws[i] * hs[i]), 4096) or \
                    (stop - start + 1) * nw * nh > chunk:
                break
            w, h, area, stop = nw, nh, area + ws[i] * hs[i], stop + 1
        n = forms.copy_to_device(order[start:stop], torch.int64, windows.device)
        win = windows[n]  # (k, 4)
        ys = win[:, 1:2] + torch.arange(h, device=windows.device)  # (k, h)
        xs = win[:, 0:1] + torch.arange(w, device=windows.device)  # (k, w)
        inside = (ys < win[:, 3:4])[:, :, None] & (xs < win[:, 2:3])[:, None, :]  # (k, h, w)
        yield n, ys, xs, inside
        start = stop


def _one_bucket(windows: Tensor):
    """`_buckets` with no host read, for exported graphs: every mask in one group, padded to the largest window
    sides (data-dependent sizes). Yields one (n, ys, xs, inside) as `_buckets` does; empty windows are all outside."""
    sizes = torch.cat((windows[:, 2:] - windows[:, :2], windows.new_zeros(1, 2))).clamp(min=0).amax(0)  # (w, h)
    w, h = sizes.tolist()  # unbacked ints, at most the image sides (windows are clamped to the image)
    n = torch.arange(windows.shape[0], device=windows.device)
    ys = windows[:, 1:2] + torch.arange(h, device=windows.device)  # (N, h)
    xs = windows[:, 0:1] + torch.arange(w, device=windows.device)  # (N, w)
    inside = (ys < windows[:, 3:4])[:, :, None] & (xs < windows[:, 2:3])[:, None, :]  # (N, h, w)
    yield n, ys, xs, inside


def paste_masks_detectron2(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int],
                           threshold: float = 0.5, *, impl: str = "auto") -> Tensor:
    """detectron2's paste_masks_in_image, with the result of its CPU path (one mask at a time, skip_empty).

    masks: Tensor[N, M, M] with values in [0, 1]; boxes: Tensor[N, 4] float xyxy in image pixels.
    Returns Tensor[N, H, W] bool (soft >= threshold), or uint8 (soft * 255) when threshold < 0.
    impl: "auto", "cpu", "gpu" (`_buckets`' grouping; the same result) or "reference"
    (`minseg.ops.reference.paste_masks_detectron2`, one mask at a time; equal to the fast forms exactly).
    """
    form = forms.choose(impl, masks)
    if form == "reference":
        return reference.paste_masks_detectron2(masks, boxes, image_shape, threshold).to(masks.device)
    N = masks.shape[0]
    H, W = image_shape
    buffer = torch.zeros(N * H * W + 1, dtype=torch.bool if threshold >= 0 else torch.uint8, device=masks.device)
    out = buffer[:-1].view(N, H, W)  # the last element takes the writes of padding pixels
    if guard_or_false(N == 0):  # (unknown when exported: the general path pastes no masks too)
        return out
    if not masks.dtype.is_floating_point:
        masks = masks.float()
    x0 = (boxes[:, 0].floor() - 1).clamp(min=0)  # the window of mask_ops.py's skip_empty path
    y0 = (boxes[:, 1].floor() - 1).clamp(min=0)
    x1 = (boxes[:, 2].ceil() + 1).clamp(max=W)
    y1 = (boxes[:, 3].ceil() + 1).clamp(max=H)
    windows = torch.stack((x0, y0, x1, y1), dim=1).to(torch.int32).long()  # (N, 4)
    groups = _one_bucket(windows) if torch.compiler.is_compiling() else _buckets(windows, padded=form == "gpu")
    for n, ys, xs, inside in groups:
        b = boxes[n]  # (k, 4)
        gx = (xs.float() + 0.5 - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1  # (k, w), the original's float order
        gy = (ys.float() + 0.5 - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1  # (k, h)
        k, Mh, Mw = inside.shape
        grid = torch.stack((gx[:, None, :].expand(k, Mh, Mw), gy[:, :, None].expand(k, Mh, Mw)), dim=3)  # (k, h, w, 2)
        soft = F.grid_sample(masks[n, None], grid.to(masks.dtype), align_corners=False)[:, 0]  # (k, h, w)
        vals = soft >= threshold if threshold >= 0 else (soft * 255).to(torch.uint8)
        target = n[:, None, None] * (H * W) + ys[:, :, None] * W + xs[:, None, :]
        buffer[torch.where(inside, target, N * H * W)] = vals
    return out
