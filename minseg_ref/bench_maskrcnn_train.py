"""One Mask R-CNN training step (train-mode forward, the five losses, backward) against torchvision's on the same
weights, images, targets and seed. Run: python -m minseg_ref.bench_maskrcnn_train [--device cuda] [--repeats 3]
[--min-size 800] [--name maskrcnn_resnet50_fpn]. Prints ABAB-interleaved medians (ms) and their ratio."""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def step(model, xs, targets, seed: int) -> None:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = model(xs, [dict(t) for t in targets])
    sum(losses.values()).backward()


def bench(name: str, device: str, repeats: int, min_size: int) -> dict:
    from minseg_ref.parity_maskrcnn import images
    from minseg_ref.train_maskrcnn import build_train_pair, make_targets

    max_size = round(min_size * 1333 / 800)
    ref, ours = build_train_pair(name, "bn", min_size=min_size, max_size=max_size)
    ref, ours = ref.to(device), ours.to(device)
    sizes = [(480, 640), (427, 640)]  # resized to ~800x1067 at min_size 800
    xs = [x.to(device) for x in images(sizes, seed=1)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in make_targets(sizes, [5, 4], seed=1)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {"ours": [], "original": []}
    for i in range(repeats + 1):  # the first round warms up
        for side, model in (("ours", ours), ("original", ref)):
            sync()
            t = time.perf_counter()
            step(model, xs, targets, seed=i)
            sync()
            if i:
                times[side].append((time.perf_counter() - t) * 1000)
    ours_ms, ref_ms = statistics.median(times["ours"]), statistics.median(times["original"])
    return {"model": name, "device": device, "min_size": min_size, "ours_ms": ours_ms, "original_ms": ref_ms,
            "ratio": ours_ms / ref_ms}


def train_steps(name: str, device: str, min_size: int = 800) -> dict:
    """{"ours": step, "original": step}: one training step each (forward, the five losses, backward) on the same
    weights, 2 images resized to ~800x1067, targets and seed (setup for bench.compare_sides)."""
    from minseg_ref.parity_maskrcnn import images
    from minseg_ref.train_maskrcnn import build_train_pair, make_targets

    ref, ours = build_train_pair(name, "bn", min_size=min_size, max_size=round(min_size * 1333 / 800))
    ref, ours = ref.to(device), ours.to(device)
    sizes = [(480, 640), (427, 640)]
    xs = [x.to(device) for x in images(sizes, seed=1)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in make_targets(sizes, [5, 4], seed=1)]

    def side(model):
        def run() -> None:
            with torch.inference_mode(False), torch.enable_grad():  # the bench harness calls us under inference_mode
                step(model, xs, targets, seed=0)
        return run
    return {"ours": side(ours), "original": side(ref)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="maskrcnn_resnet50_fpn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-size", type=int, default=800)
    a = p.parse_args()
    print(bench(a.name, a.device, a.repeats, a.min_size))
