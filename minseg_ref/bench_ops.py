"""Time minseg.ops against torchvision.ops on the same inputs, ABAB-interleaved, medians.

Workloads (issue 4): RoIAlign with K=1000 RoIs on a [2, 256, 200, 272] map (stride 4, boxes log-uniform
16..512 px, some crossing the border) at 7x7 and 14x14, sampling_ratio 2 (torchvision's Mask R-CNN,
aligned=False) and 0 (detectron2's ROIAlignV2, aligned=True); NMS on 1000 and 5000 clustered boxes (thr 0.5).
A 1024^2 matmul rate is printed beside the table, because this shared machine changes speed by 2-3x.

    python -m minseg_ref.bench_ops [--device cpu|cuda] [--repeats N] [--threads T]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision.ops as tvo

import minseg.ops as mo


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def _alternate(ours, original, device: str, repeats: int) -> tuple[float, float]:
    _time(ours, device), _time(original, device)  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(ours, device))
        b.append(_time(original, device))
    return statistics.median(a), statistics.median(b)


def roi_inputs(device: str, K: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features Tensor[2, 256, 200, 272] and rois Tensor[K, 5] in image pixels (stride 4)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 256, 200, 272, generator=g)
    size = torch.exp(torch.empty(K, 2).uniform_(torch.log(torch.tensor(16.0)), torch.log(torch.tensor(512.0)),
                                                generator=g))  # (K, 2) log-uniform w, h
    xy = torch.rand(K, 2, generator=g) * torch.tensor([1088.0, 800.0]) - size / 4
    batch = torch.randint(0, 2, (K, 1), generator=g).float()
    rois = torch.cat([batch, xy, xy + size], dim=1)
    return features.to(device), rois.to(device)


def nms_inputs(device: str, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """N boxes in N/20 clusters (a realistic overlap pattern), scores without ties."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(N // 20, 1), 2, generator=g) * 1000
    c = centres[torch.randint(0, len(centres), (N,), generator=g)] + torch.randn(N, 2, generator=g) * 8
    wh = 20 + torch.rand(N, 2, generator=g) * 60
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
    scores = torch.rand(N, generator=g)
    return boxes.to(device), scores.to(device)


def bench_ops(device: str = "cpu", repeats: int = 5) -> list[dict]:
    """One row per workload: name, input, ours_ms, original_ms, ratio (ours / torchvision)."""
    rows = []
    features, rois = roi_inputs(device)
    for P in (7, 14):
        for sr, aligned in ((2, False), (0, True)):
            ours, orig = _alternate(lambda: mo.roi_align(features, rois, P, 0.25, sr, aligned),
                                    lambda: tvo.roi_align(features, rois, P, 0.25, sr, aligned), device, repeats)
            rows.append({"name": f"roi_align {P}x{P} sr={sr}", "input": "K=1000 [2,256,200,272]",
                         "ours_ms": ours, "original_ms": orig, "ratio": ours / orig})
    del features
    for N in (1000, 5000):
        boxes, scores = nms_inputs(device, N)
        ours, orig = _alternate(lambda: mo.nms(boxes, scores, 0.5), lambda: tvo.nms(boxes, scores, 0.5),
                                device, repeats)
        rows.append({"name": f"nms N={N}", "input": f"{N} clustered boxes", "ours_ms": ours,
                     "original_ms": orig, "ratio": ours / orig})
        idxs = torch.randint(0, 5, (N,), generator=torch.Generator().manual_seed(1)).to(device)
        ours, orig = _alternate(lambda: mo.batched_nms(boxes, scores, idxs, 0.5),
                                lambda: tvo.batched_nms(boxes, scores, idxs, 0.5), device, repeats)
        rows.append({"name": f"batched_nms N={N}", "input": f"{N} boxes, 5 classes", "ours_ms": ours,
                     "original_ms": orig, "ratio": ours / orig})
    return rows


def gemm_rate(device: str) -> float:
    """GFLOP/s of a 1024^2 float32 matmul right now (context for the absolute times)."""
    a = torch.randn(1024, 1024, device=device)
    ms = statistics.median(_time(lambda: a @ a, device) for _ in range(5))
    return 2 * 1024**3 / (ms / 1000) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torchvision's kernels use one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, threads {torch.get_num_threads()}, matmul {gemm_rate(args.device):.0f} GFLOP/s")
    print(f"{'op':<24}{'minseg ms':>12}{'torchvision ms':>16}{'ratio':>8}")
    for r in bench_ops(args.device, args.repeats):
        print(f"{r['name']:<24}{r['ours_ms']:>12.1f}{r['original_ms']:>16.1f}{r['ratio']:>8.2f}")
    print(f"matmul after: {gemm_rate(args.device):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
