"""Where the time of one call goes, minseg beside torchvision: torch.profiler tables of the busiest ops.

For the GPU session that has to explain a ratio: per workload and side it prints the wall time, the host
(CPU) time, the device time, the number of kernel launches and the ops that take the most device time (or
host time, on the CPU). Workloads: a Mask R-CNN forward (2 images, 100 detections each, as `minseg bench`),
a Mask R-CNN training step at min_size 320 (forward, five losses, backward; `minseg bench --train`'s step at a
size that profiles quickly), RoIAlign 7x7 sampling 2 and 0, and NMS on 1000 boxes (as `minseg_ref.bench_ops`).

    python -m minseg_ref.profile_tables [--device cuda] [--rows N] [WORKLOAD ...]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from minseg_ref.bench import sync


def workloads(device: str) -> dict:
    """name -> function() -> {"ours": fn, "original": fn} (built lazily: the models take a while)."""
    import torchvision.ops as tvo

    import minseg.ops as mo
    from minseg_ref import bench_maskrcnn, bench_maskrcnn_train
    from minseg_ref.bench_ops import nms_inputs, roi_inputs

    def roi(sr: int, aligned: bool) -> dict:
        features, rois = roi_inputs(device)
        return {"ours": lambda: mo.roi_align(features, rois, 7, 0.25, sr, aligned),
                "original": lambda: tvo.roi_align(features, rois, 7, 0.25, sr, aligned)}

    def nms() -> dict:
        boxes, scores = nms_inputs(device, 1000)
        return {"ours": lambda: mo.nms(boxes, scores, 0.5), "original": lambda: tvo.nms(boxes, scores, 0.5)}

    return {"maskrcnn_resnet50_fpn": lambda: bench_maskrcnn.forwards("maskrcnn_resnet50_fpn", device),
            "maskrcnn_train_320": lambda: bench_maskrcnn_train.train_steps("maskrcnn_resnet50_fpn", device, 320),
            "roi_align_7x7_sr2": lambda: roi(2, False), "roi_align_7x7_sr0": lambda: roi(0, True), "nms_1000": nms}


def profile_call(fn, device: str, rows: int) -> str:
    """One warm-up call, then one profiled call: a summary line and the top `rows` ops."""
    with torch.inference_mode():
        fn()
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            sync(device)
            wall = (time.perf_counter() - start) * 1000
    events = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1000
    line = f"wall {wall:.1f} ms, host {host:.1f} ms"
    sort_by = "self_cpu_time_total"
    if device == "cuda":  # launches: the runtime calls (cudaLaunchKernel, cuLaunchKernelEx, ...) on the host
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        line += f", device {sum(e.self_device_time_total for e in events) / 1000:.1f} ms, {launches} kernel launches"
        sort_by = "self_device_time_total"
    return line + "\n" + events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=48)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", help="default: all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    table = workloads(args.device)
    for name in args.workloads or list(table):
        sides = table[name]()
        for side in ("ours", "original"):
            print(f"== {name} {side} ({args.device}): {profile_call(sides[side], args.device, args.rows)}")


if __name__ == "__main__":
    main()
