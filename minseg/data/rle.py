"""COCO's mask encodings in plain numpy: run-length encoding (RLE), its compressed string form, and polygons.

These follow pycocotools' `maskApi.c` so that a dataset read here gives the masks pycocotools gives:
- an RLE is {"size": [H, W], "counts": ...}: run lengths over the mask in column-major (Fortran) order,
  starting with a run of zeros (possibly empty);
- the compressed form (`rleToString`) writes each count, minus the count two places back from the fourth
  on, as 5-bit groups of a signed LEB128-like code in the characters 48..111;
- a polygon is rasterised as `rleFrPoly` does: vertices scaled by 5 and rounded, the outline traced
  densely, one boundary point kept per column crossing, and the pixels between boundary points filled.
"""
from __future__ import annotations

import numpy as np
import torch

POLY_SCALE = 5  # rleFrPoly traces the outline on a 5x finer grid


def encode(mask: torch.Tensor | np.ndarray) -> dict:
    """Bool Tensor[H, W] -> uncompressed RLE {"size": [H, W], "counts": list[int]} (pycocotools' rleEncode)."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    H, W = mask.shape
    flat = mask.T.reshape(-1)                                 # (W*H,) column-major, as COCO stores masks
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(H), int(W)], "counts": counts}


def compress(counts: list[int]) -> str:
    """Run lengths -> pycocotools' compressed string (rleToString)."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count  # from the fourth count on, the difference to two back
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends in all ones
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def decompress(text: str | bytes) -> list[int]:
    """pycocotools' compressed string -> run lengths (rleFrString)."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:  # sign-extend
                x |= -1 << 5 * k
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode(rle: dict) -> torch.Tensor:
    """RLE with list counts or a compressed string -> bool Tensor[H, W] (pycocotools' rleDecode)."""
    H, W = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = np.asarray(decompress(counts) if isinstance(counts, (str, bytes)) else counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != H * W:
        raise ValueError(f"RLE counts sum to {counts.sum()}, not {H}x{W} = {H * W}")
    values = np.arange(len(counts)) % 2 == 1                  # runs alternate zeros, ones, zeros, ...
    flat = np.repeat(values, counts)                          # (W*H,) column-major
    return torch.from_numpy(np.ascontiguousarray(flat.reshape(W, H).T))


def polygon_to_mask(xy: list[float], h: int, w: int) -> torch.Tensor:
    """One polygon [x0, y0, x1, y1, ...] in pixel coordinates -> bool Tensor[h, w], as pycocotools' rleFrPoly.

    A pixel (column x, row y) is inside when the outline crosses the vertical line through its centre
    an odd number of times above it; crossings are found on the outline traced on a 5x grid.
    """
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    x = np.trunc(POLY_SCALE * pts[:, 0] + 0.5).astype(np.int64)  # C's (int) cast truncates towards zero
    y = np.trunc(POLY_SCALE * pts[:, 1] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])               # closed outline
    # 1. trace every edge densely: one point per step along its longer axis (kept: the edge is walked from
    #    its lower end, so the rounding is the same whichever way the polygon turns)
    us, vs = [], []
    for j in range(len(pts)):
        xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
        dx, dy = abs(xe - xs), abs(ye - ys)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    # 2. where the traced outline changes column, a boundary point at a pixel centre column (downsampled)
    step = np.flatnonzero(u[1:] != u[:-1]) + 1
    xd = np.where(u[step] < u[step - 1], u[step], u[step] - 1).astype(np.float64)
    xd = (xd + 0.5) / POLY_SCALE - 0.5
    yd = np.minimum(v[step], v[step - 1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / POLY_SCALE - 0.5, 0, h))
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    # 3. each boundary point toggles inside/outside from its pixel on, down the column-major order
    toggles = np.zeros(h * w + 1, dtype=np.int64)
    np.add.at(toggles, xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64), 1)
    flat = np.cumsum(toggles[: h * w]) % 2 == 1               # (w*h,) column-major
    return torch.from_numpy(np.ascontiguousarray(flat.reshape(w, h).T))


def segmentation_to_mask(segmentation, h: int, w: int) -> torch.Tensor:
    """A COCO annotation's "segmentation" (a list of polygons, or an RLE with list or string counts) ->
    bool Tensor[h, w]; several polygons are united (pycocotools' annToMask)."""
    if isinstance(segmentation, list):
        mask = torch.zeros(h, w, dtype=torch.bool)
        for polygon in segmentation:
            mask |= polygon_to_mask(polygon, h, w)
        return mask
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [h, w]:
            raise ValueError(f"RLE of size {segmentation['size']} for an image of {h}x{w}")
        return decode(segmentation)
    raise ValueError(f"segmentation is neither polygons nor an RLE: {str(segmentation)[:60]}")
