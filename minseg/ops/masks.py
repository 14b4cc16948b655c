"""Pasting fixed-size instance masks (28x28 from the mask head) into full-image masks, as each original does.

torchvision (models/detection/roi_heads.py, paste_masks_in_image; Detectron1 style): pad the mask by one
pixel of zeros, grow the box by (M + 2) / M about its centre, truncate it to integers, bilinearly resize the
padded mask to the integer box size (F.interpolate, align_corners=False) and copy it into a zero image.
Returns soft masks Tensor[N, 1, H, W]. Here the resize is separable and done for all masks at once: one gather
along x and one along y, with F.interpolate's source indices and weights.

detectron2 (layers/mask_ops.py, paste_masks_in_image): sample the mask with grid_sample at the centres of
image pixels mapped into the float box, then threshold (>= 0.5). On CPU the original pastes one mask at a
time, sampling only the window [floor(x0) - 1, ceil(x1) + 1) around its box (everything else stays False);
here all windows are padded to the largest and sampled in one grid_sample call per chunk of masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 23  # output pixels computed per chunk of masks (bounds the temporaries)


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow Tensor[N, 4] xyxy boxes about their centres by `scale` (torchvision's expand_boxes)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def _resize_taps(out_pos: Tensor, out_size: Tensor, in_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear (align_corners=False) source taps for output positions of per-mask output sizes.

    out_pos: Tensor[N, L] int64 output indices; out_size: Tensor[N, 1] int64. Returns i0, i1 (int64) and
    w0, w1 (float32), each Tensor[N, L], as PyTorch's upsample kernel computes them: scale = in / out in
    float32, src = scale * (j + .5) - .5 (fused multiply-add in the AVX2 kernel, reproduced in float64),
    clamped at 0; i0 = floor(src) capped at in - 1; lambda = src - i0 clamped to [0, 1].
    """
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size.float()  # (N, 1)
    j = out_pos.float() + 0.5
    src = (scale.double() * j.double() - 0.5).float().clamp(min=0)  # (N, L)
    i0 = src.floor().clamp(max=in_size - 1)
    lam = (src - i0).clamp(0, 1)
    i0 = i0.long()
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, 1 - lam, lam


def paste_masks_torchvision(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """torchvision's paste_masks_in_image.

    masks: Tensor[N, 1, M, M] soft masks; boxes: Tensor[N, 4] xyxy in image pixels; image_shape: (H, W).
    Returns Tensor[N, 1, H, W] in the masks' dtype, zero outside each (expanded, integer) box.
    """
    N, _, M, _ = masks.shape
    H, W = image_shape
    if N == 0:
        return masks.new_empty((0, 1, H, W))
    scale = float(M + 2 * padding) / M
    padded = F.pad(masks, (padding,) * 4)[:, 0]  # (N, Mp, Mp)
    Mp = padded.shape[-1]
    box = expand_boxes(boxes, scale).to(torch.int64)  # kept: truncation toward zero, as the original's cast
    x0, y0, x1, y1 = box[:, 0:1], box[:, 1:2], box[:, 2:3], box[:, 3:4]  # (N, 1) each
    w = (x1 - x0 + 1).clamp(min=1)
    h = (y1 - y0 + 1).clamp(min=1)
    xs = torch.arange(W, device=masks.device)[None, :]  # (1, W)
    ys = torch.arange(H, device=masks.device)[None, :]  # (1, H)
    inside_x = (xs >= x0) & (xs <= x1)  # (N, W) the copied window [max(x0, 0), min(x1 + 1, W))
    inside_y = (ys >= y0) & (ys <= y1)  # (N, H)
    cx0, cx1, wx0, wx1 = _resize_taps((xs - x0).clamp(min=0), w, Mp)  # (N, W)
    cy0, cy1, wy0, wy1 = _resize_taps((ys - y0).clamp(min=0), h, Mp)  # (N, H)
    wx0, wx1 = wx0 * inside_x, wx1 * inside_x  # zero weights outside the window
    wy0, wy1 = wy0 * inside_y, wy1 * inside_y
    src = padded.float()
    out = masks.new_empty((N, 1, H, W))
    step = max(1, _CHUNK_ELEMENTS // (H * W))
    for s in range(0, N, step):
        e = min(s + step, N)
        m = src[s:e]
        # along x, for every mask row: t[n, r, x] = m[n, r, cx0] * wx0 + m[n, r, cx1] * wx1
        t = (torch.gather(m, 2, cx0[s:e, None, :].expand(-1, Mp, -1)) * wx0[s:e, None, :]
             + torch.gather(m, 2, cx1[s:e, None, :].expand(-1, Mp, -1)) * wx1[s:e, None, :])  # (n, Mp, W)
        # along y: out[n, y, x] = t[n, cy0, x] * wy0 + t[n, cy1, x] * wy1
        top = torch.gather(t, 1, cy0[s:e, :, None].expand(-1, -1, W)) * wy0[s:e, :, None]  # (n, H, W)
        bottom = torch.gather(t, 1, cy1[s:e, :, None].expand(-1, -1, W)) * wy1[s:e, :, None]
        out[s:e, 0] = top.add_(bottom).to(masks.dtype)
    return out


def _windows(boxes: Tensor, H: int, W: int) -> Tensor:
    """Per-box sampling window of detectron2's CPU path: Tensor[N, 4] int64 (x0, y0, x1, y1), end exclusive."""
    x0 = (boxes[:, 0].floor() - 1).clamp(min=0)
    y0 = (boxes[:, 1].floor() - 1).clamp(min=0)
    x1 = (boxes[:, 2].ceil() + 1).clamp(max=W)
    y1 = (boxes[:, 3].ceil() + 1).clamp(max=H)
    return torch.stack((x0, y0, x1, y1), dim=1).to(torch.int32).long()


def paste_masks_detectron2(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int],
                           threshold: float = 0.5) -> Tensor:
    """detectron2's paste_masks_in_image, with the result of its CPU path (one mask at a time, skip_empty).

    masks: Tensor[N, M, M] with values in [0, 1]; boxes: Tensor[N, 4] float xyxy in image pixels.
    Returns Tensor[N, H, W] bool (soft >= threshold), or uint8 (soft * 255) when threshold < 0.
    """
    N = masks.shape[0]
    H, W = image_shape
    out_dtype = torch.bool if threshold >= 0 else torch.uint8
    out = torch.zeros((N, H, W), dtype=out_dtype, device=masks.device)
    if N == 0:
        return out
    if not masks.dtype.is_floating_point:
        masks = masks.float()
    win = _windows(boxes, H, W)  # (N, 4)
    sizes = (win[:, 2:] - win[:, :2]).clamp(min=0)  # (N, 2) window (w, h)
    max_w, max_h = (int(v) for v in sizes.max(dim=0).values.tolist())  # host read: window sizes
    if max_w == 0 or max_h == 0:
        return out
    bx0, by0, bx1, by1 = boxes.split(1, dim=1)  # (N, 1) each
    step = max(1, _CHUNK_ELEMENTS // (max_w * max_h))
    for s in range(0, N, step):
        e = min(s + step, N)
        px = win[s:e, 0:1] + torch.arange(max_w, device=masks.device)  # (n, max_w) image columns
        py = win[s:e, 1:2] + torch.arange(max_h, device=masks.device)  # (n, max_h) image rows
        gx = (px.float() + 0.5 - bx0[s:e]) / (bx1[s:e] - bx0[s:e]) * 2 - 1  # same float order as the original
        gy = (py.float() + 0.5 - by0[s:e]) / (by1[s:e] - by0[s:e]) * 2 - 1
        n = e - s
        grid = torch.stack((gx[:, None, :].expand(n, max_h, max_w), gy[:, :, None].expand(n, max_h, max_w)), dim=3)
        soft = F.grid_sample(masks[s:e, None], grid.to(masks.dtype), align_corners=False)[:, 0]  # (n, max_h, max_w)
        vals = soft >= threshold if threshold >= 0 else (soft * 255).to(torch.uint8)
        valid = (px < win[s:e, 2:3])[:, None, :] & (py < win[s:e, 3:4])[:, :, None]  # (n, max_h, max_w)
        k = torch.arange(s, e, device=masks.device)[:, None, None].expand(n, max_h, max_w)
        out[k[valid], py[:, :, None].expand(n, max_h, max_w)[valid], px[:, None, :].expand(n, max_h, max_w)[valid]] = vals[valid]
    return out
