"""Each family's default optimiser and learning-rate schedule, as its original's training recipe sets them.

    family        optimiser                              schedule                         source
    semantic      SGD 0.01, momentum 0.9, wd 1e-4,        poly (1 - t/T)^0.9 per step      torchvision references/
                  the aux head at 10x lr; 32 images                                        segmentation/train.py
    maskrcnn      SGD 0.02, momentum 0.9, wd 1e-4;        linear warmup from 1/1000 over   torchvision references/
                  16 images                               1000 steps, x0.1 at 16/26, 22/26  detection/train.py
    panoptic_fpn  SGD 0.02, momentum 0.9, wd 1e-4;        linear warmup from 1/1000 over   detectron2 Base-RCNN-FPN
                  16 images                               1000 steps, x0.1 at 210k/270k,   + panoptic_fpn_R_*_3x
                                                          250k/270k
    yolact        SGD 1e-3, momentum 0.9, wd 5e-4;        linear warmup from lr 1e-4 over  YOLACT data/config.py
                  8 images                                500 steps, x0.1 at 280k, 600k,   yolact_base_config
                                                          700k, 750k of 800k
    unet          Adam 1e-4 (torch defaults otherwise);   constant                         smp's example notebooks
                  8 images

A run of another length keeps the milestones at the same fractions of the run, and its warmup lasts the
original's number of steps but at most a tenth of the run. The default learning rate follows the linear scaling
rule (Goyal et al. 2017): the original's lr times the run's global batch over the original's. `--lr` sets it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Schedule:
    lr: float                      # at the original's global batch
    batch: int                     # the original's global batch
    optimizer: str                 # "sgd" or "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_factor: float = 1.0     # lr factor at step 0 of the warmup, rising linearly to 1
    warmup_init: float = 0.0       # > 0: the warmup starts at this lr whatever the run's lr (YOLACT's lr_warmup_init)
    milestones: tuple[float, ...] = ()  # fractions of the run where the lr is multiplied by gamma
    gamma: float = 0.1
    poly: float = 0.0              # > 0: (1 - step / total) ** poly
    head_lr: dict[str, float] | None = None  # parameter-name prefix -> lr factor
    norm_weight_decay: float | None = None   # weight decay of norm layers' weight and bias (None: weight_decay)

    def factor(self, step: int, total: int, lr: float) -> float:
        """The multiplier of the run's `lr` at `step` (0-based) of a run of `total` steps."""
        f = 1.0
        warmup = min(self.warmup_steps, total // 10)
        if step < warmup:  # torchvision's LinearLR, detectron2's WarmupMultiStepLR "linear", YOLACT's set_lr ramp
            alpha = step / warmup
            start = self.warmup_init / lr if self.warmup_init > 0 and lr > 0 else self.warmup_factor
            f = start * (1 - alpha) + alpha
        if self.poly > 0:
            f *= (1 - step / total) ** self.poly
        for m in self.milestones:
            if step >= int(m * total):
                f *= self.gamma
        return f


SCHEDULES = {
    "semantic": Schedule(lr=0.01, batch=32, optimizer="sgd", weight_decay=1e-4, poly=0.9, head_lr={"aux_head.": 10.0}),
    "maskrcnn": Schedule(lr=0.02, batch=16, optimizer="sgd", weight_decay=1e-4, warmup_steps=1000,
                         warmup_factor=1e-3, milestones=(16 / 26, 22 / 26)),
    "panoptic_fpn": Schedule(lr=0.02, batch=16, optimizer="sgd", weight_decay=1e-4, warmup_steps=1000,
                             warmup_factor=1e-3, milestones=(210 / 270, 250 / 270),
                             norm_weight_decay=0.0),  # SOLVER.WEIGHT_DECAY_NORM: matters with norm="GN" or "BN"
    "yolact": Schedule(lr=1e-3, batch=8, optimizer="sgd", weight_decay=5e-4, warmup_steps=500, warmup_init=1e-4,
                       milestones=(0.35, 0.75, 0.875, 0.9375)),  # train.py scales lr to the batch, not lr_warmup_init
    "unet": Schedule(lr=1e-4, batch=8, optimizer="adam"),
}


def default_lr(family: str, global_batch: int) -> float:
    s = SCHEDULES[family]
    return s.lr * global_batch / s.batch


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
         nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)  # detectron2's norm_module_types


def build_optimizer(family: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The family's optimiser over the parameters that train (requires_grad), grouped by lr factor and weight
    decay (detectron2's get_default_optimizer_params gives norm layers SOLVER.WEIGHT_DECAY_NORM); each group
    remembers its factor as "lr_factor" so that set_lr can apply the schedule."""
    s = SCHEDULES[family]
    in_norm = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = next((f for prefix, f in (s.head_lr or {}).items() if name.startswith(prefix)), 1.0)
            decay = s.norm_weight_decay if id(p) in in_norm and s.norm_weight_decay is not None else s.weight_decay
            groups.setdefault((factor, decay), []).append(p)
    params = [{"params": ps, "lr": lr * f, "lr_factor": f, "weight_decay": wd} for (f, wd), ps in groups.items()]
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, family: str, lr: float, step: int, total: int) -> float:
    """Set every group's lr for `step`; returns the base lr (the main group's)."""
    current = lr * SCHEDULES[family].factor(step, total, lr)
    for group in optimizer.param_groups:
        group["lr"] = current * group["lr_factor"]
    return current
