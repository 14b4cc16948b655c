"""`minseg bench --train`: one training step of the semantic models and Mask R-CNN against the original's, same
weights and batch.

A semantic step is the forward in train mode, the loss (torchvision's reference criterion with aux for FCN / DeepLabV3,
smp's Dice + Focal for U-Net), backward, and an SGD step (momentum 0.9, weight decay 1e-4), both sides built by
minseg_ref/parity_train.py. Mask R-CNN's (forward, the five losses, backward; 2 images at ~800x1067) is
minseg_ref/bench_maskrcnn_train.py's. YOLACT's (the four losses, backward, SGD on the recorded training batch) is
minseg_ref/parity_yolact_train.py's, timed alone: its original cannot run here. Timing and peak memory come from
minseg_ref/bench.py's compare_sides (ours_only for YOLACT) unchanged: it calls each side under
torch.inference_mode, so a step turns inference mode back off inside itself. The CPU peak is then the resident-set
high-water mark of one step beyond the resident set before it (weights, gradients of the previous step, optimizer
state already there), each side alone in a fresh process.
"""
from __future__ import annotations

from typing import Callable

import torch

from minseg_ref.bench import BenchRow, compare_sides, ours_only

TRAIN_BENCH = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101", "unet_resnet34",
               "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "yolact_resnet50"]
BATCH, SIZE, NUM_CLASSES = 2, (256, 256), 21


def sgd_step(model: torch.nn.Module, criterion, x: torch.Tensor, y: torch.Tensor):
    """A zero-argument training step on (x, y); returns the detached loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():  # the bench harness calls us under inference_mode
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.detach()
    return step


def train_steps(name: str, device: str) -> dict:
    """{"ours": step, "original": step} on a batch of 2 at 256x256 with ignored pixels (setup for compare_sides)."""
    from minseg_ref.parity_train import build_train_pair, make_batch

    ref, ours, ref_loss, our_loss = build_train_pair(name, NUM_CLASSES, seed=0)
    x, y = make_batch(NUM_CLASSES, SIZE, BATCH, seed=0)
    ref, ours, x, y = ref.to(device), ours.to(device), x.to(device), y.to(device)
    return {"ours": sgd_step(ours, our_loss, x, y), "original": sgd_step(ref, ref_loss, x, y)}


def bench_train(name: str, device: str, repeats: int) -> BenchRow:
    if name.startswith("yolact"):  # the recorded training batch; the original cannot run here
        from minseg_ref.parity_yolact_train import train_steps as yolact_steps

        ms, peak = ours_only(yolact_steps, [], device, repeats)
        return BenchRow(name, device, "2x3x550x550, 27 objects", ms, None, peak, None,
                        note="train step (4 losses, backward, SGD); original not runnable here, no published step time")
    if name.startswith("maskrcnn"):  # forward, the five losses, backward: minseg_ref/bench_maskrcnn_train.py
        from minseg_ref.bench_maskrcnn_train import train_steps as maskrcnn_steps

        t_ours, t_ref, p_ours, p_ref = compare_sides(maskrcnn_steps, [name], device, repeats)
        return BenchRow(name, device, "2 images, ~800x1067", t_ours, t_ref, p_ours, p_ref,
                        note="train step (5 losses, backward); peak MB of one step")
    t_ours, t_ref, p_ours, p_ref = compare_sides(train_steps, [name], device, repeats)
    loss = "CE+0.5 aux CE" if name != "unet_resnet34" else "Dice+Focal"
    return BenchRow(name, device, f"{BATCH}x3x{SIZE[0]}x{SIZE[1]}", t_ours, t_ref, p_ours, p_ref,
                    note=f"train step ({loss}, backward, SGD); peak MB of one step")


def run(models: list[str] | None, device: str = "cpu", ops: bool = False, repeats: int = 3,
        on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """One training step of each of `models` (all when None), ours and the original's; `on_row` gets each row
    as soon as it is measured."""
    if ops:
        raise ValueError("--ops times inference operators; run it without --train")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    unknown = [m for m in models or [] if m not in TRAIN_BENCH]
    if unknown:
        raise ValueError(f"no training benchmark for {', '.join(unknown)}; available: {', '.join(TRAIN_BENCH)}")
    rows = []
    for name in models or TRAIN_BENCH:
        rows.append(bench_train(name, device, repeats))
        if on_row is not None:
            on_row(rows[-1])
    return rows
