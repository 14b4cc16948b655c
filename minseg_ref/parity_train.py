"""Train-mode parity of FCN, DeepLabV3 (torchvision) and U-Net (smp): the same training recipe on both sides.

Each side gets the same seeded weights (the original's own init, converted), the same batch (2 images at an odd
size, some pixels labelled 255 = ignore) and runs `steps` SGD steps (momentum, weight decay) with
torch.manual_seed(seed + step) before each forward, so dropout (FCN head p=0.1, ASPP p=0.5) draws the same masks
when both sides draw in the same order. Compared: each step's loss, every parameter's gradient at the first step,
and the whole state dict (weights, BatchNorm running statistics and counters) after the last step. Parameters are
matched by name through minseg's converter (the originals' gradients are renamed like a checkpoint).

The originals' criteria: torchvision's reference criterion (references/segmentation/train.py, written out below as
it is not in the installed package) for FCN / DeepLabV3 with aux, smp.losses.DiceLoss + FocalLoss for U-Net.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import minseg
from minseg_ref.common import ParityRow, Tally

IGNORE = 255
TRAIN_NAMES = ["fcn_resnet50", "deeplabv3_resnet50", "unet_resnet34"]


def torchvision_criterion(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """references/segmentation/train.py `criterion`: CE on every output (ignore 255), out + 0.5 * aux."""
    losses = {name: F.cross_entropy(x, target, ignore_index=IGNORE) for name, x in inputs.items()}
    return losses["out"] if len(losses) == 1 else losses["out"] + 0.5 * losses["aux"]


def build_train_pair(name: str, num_classes: int, seed: int = 0):
    """(original, minseg model, original's criterion, minseg's criterion), both models in train mode.
    FCN / DeepLabV3 with the aux head (torchvision's seeded init); U-Net from smp's seeded init (norms perturbed)."""
    import minseg.losses as ML

    if name == "unet_resnet34":
        import segmentation_models_pytorch as smp
        from minseg_ref.parity_unet import build_pair

        ref, ours = build_pair(num_classes=num_classes, seed=seed)
        dice = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE)
        focal = smp.losses.FocalLoss("multiclass", ignore_index=IGNORE)
        our_dice = ML.DiceLoss("multiclass", ignore_index=IGNORE)
        our_focal = ML.FocalLoss("multiclass", ignore_index=IGNORE)
        ref_loss = lambda out, y: dice(out, y) + focal(out, y)
        our_loss = lambda out, y: our_dice(out, y) + our_focal(out, y)
    else:
        from minseg_ref.parity_semantic import build_pair

        ref, ours = build_pair(name, num_classes=num_classes, aux_loss=True, seed=seed)
        ref_loss, our_loss = torchvision_criterion, ML.segmentation_loss
    return ref.train(), ours.train(), ref_loss, our_loss


def make_batch(num_classes: int, size: tuple[int, int] = (37, 53), batch: int = 2, seed: int = 0):
    """(images Tensor[N, 3, H, W], labels Tensor[N, H, W] int64): a band of ignored pixels and, in image 0, a
    class left out (an empty class for the region losses)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=g)
    y = torch.randint(0, num_classes, (batch, *size), generator=g)
    y[0][y[0] == num_classes - 1] = 0
    y[:, size[0] // 3: size[0] // 3 + 5] = IGNORE
    return x, y


@dataclass
class TrainRun:
    losses: list[torch.Tensor] = field(default_factory=list)
    first_grads: dict[str, torch.Tensor] = field(default_factory=dict)   # by the model's own parameter names
    state: dict[str, torch.Tensor] = field(default_factory=dict)         # after the last step


def train(model: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor, steps: int = 3, seed: int = 0,
          lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4) -> TrainRun:
    """`steps` SGD steps on one batch, torch.manual_seed(seed + step) before each forward."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    run = TrainRun()
    for step in range(steps):
        torch.manual_seed(seed + step)
        loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            run.first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        run.losses.append(loss.detach())
    run.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return run


def as_minseg_names(name: str, ref_state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict:
    """The original's per-parameter `tensors` (e.g. gradients) under minseg's names: put them in the original's
    state dict in place of the parameters and convert it like a checkpoint."""
    source = "smp" if name == "unet_resnet34" else "torchvision"
    return minseg.convert(source, {**ref_state, **tensors}, arch=name)


@dataclass
class TrainParity:
    loss: Tally
    grads: Tally
    state: Tally
    bitwise: bool
    mismatched: list[str]   # names whose gradient or final state is not bitwise equal


def compare_training(name: str, num_classes: int = 5, steps: int = 3, size: tuple[int, int] = (37, 53),
                     seed: int = 0) -> TrainParity:
    ref, ours, ref_loss, our_loss = build_train_pair(name, num_classes, seed)
    x, y = make_batch(num_classes, size, seed=seed)
    a, b = train(ref, ref_loss, x, y, steps, seed), train(ours, our_loss, x, y, steps, seed)
    loss, grads, state, mismatched = Tally(), Tally(), Tally(), []
    for la, lb in zip(a.losses, b.losses):
        loss.add(lb, la)
    ref_grads = as_minseg_names(name, ref.state_dict(), a.first_grads)
    for key, g in b.first_grads.items():
        grads.add(g, ref_grads[key])
        if not torch.equal(g, ref_grads[key]):
            mismatched.append("grad " + key)
    ref_state = as_minseg_names(name, a.state, {})
    if set(ref_state) != set(b.state):
        raise AssertionError(f"state keys differ: {sorted(set(ref_state) ^ set(b.state))[:5]}")
    for key, v in b.state.items():
        state.add(v.double(), ref_state[key].double())
        if not torch.equal(v, ref_state[key]):
            mismatched.append("state " + key)
    bitwise = not mismatched and all(torch.equal(la, lb) for la, lb in zip(a.losses, b.losses))
    return TrainParity(loss, grads, state, bitwise, mismatched)


TOLERANCE = 1e-5  # relative to each compared tensor's scale (float32 rounding level); measured: 0 (bitwise)


def check(name: str) -> ParityRow:
    r = compare_training(name)
    worst_abs = max(r.loss.max_abs, r.grads.max_abs, r.state.max_abs)
    worst_rel = max(r.loss.max_rel, r.grads.max_rel, r.state.max_rel)
    detail = (f"train: 2x3x37x53, 3 SGD steps; loss, grads, weights, running stats "
              f"{'bitwise equal' if r.bitwise else 'not bitwise equal'}")
    return ParityRow(f"{name} (train)", "torchvision" if name != "unet_resnet34" else "smp + smp.losses",
                     worst_abs, worst_rel, worst_rel <= TOLERANCE, detail)


CHECKS = {f"{name}:train": ("torchvision" if name != "unet_resnet34" else "smp + smp.losses", lambda name=name: check(name))
          for name in TRAIN_NAMES}

from minseg_ref.parity_yolact_train import CHECKS as YOLACT_TRAIN_CHECKS  # noqa: E402 (recorded YOLACT training step)

CHECKS.update(YOLACT_TRAIN_CHECKS)
