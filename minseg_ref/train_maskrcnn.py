"""Mask R-CNN training parity: torchvision's model and minseg's, the same weights, the same batch and targets,
the same seed right before each train-mode forward -> losses, gradients, running statistics, SGD steps.

Setups: "bn" (torchvision built without any weights: plain BatchNorm2d, all 5 backbone layers trainable) and
"frozen" (as torchvision builds it from ImageNet backbone weights: FrozenBatchNorm2d, 3 trainable layers; the
frozen statistics are randomised here so they matter).
"""
from __future__ import annotations

import torch

import minseg
from minseg_ref.parity_maskrcnn import images

SMALL = dict(min_size=160, max_size=267)


def build_train_pair(name: str, setup: str = "bn", seed: int = 0, **options):
    """(torchvision model, minseg model) with equal weights, both in train mode."""
    import torchvision
    from torchvision.models.detection import mask_rcnn as tv
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(seed)
    if setup == "bn":
        ref = getattr(tv, name)(weights=None, weights_backbone=None, **options)
        ours = minseg.create_model(name, norm="bn", norm_eps=1e-5, **options)
    elif setup == "frozen":  # torchvision's builder with weights_backbone, minus the download
        if name != "maskrcnn_resnet50_fpn":
            raise ValueError("torchvision's v2 keeps BatchNorm2d with trained weights: use setup='bn'")
        backbone = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
        with torch.no_grad():
            for m in backbone.modules():
                if isinstance(m, FrozenBatchNorm2d):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
        ref = tv.MaskRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=91, **options)
        ours = minseg.create_model(name, norm="frozen", norm_eps=1e-5, **options)
    else:
        raise ValueError(f"setup must be 'bn' or 'frozen', got {setup!r}")
    ours.load_state_dict(minseg.convert("torchvision", ref.state_dict(), arch=name), strict=True)
    return ref.train(), ours.train()


def make_targets(sizes, counts, seed: int = 0, num_classes: int = 91) -> list[dict[str, torch.Tensor]]:
    """Per image `counts[i]` objects: random boxes (at least 8 px a side) with elliptic masks inside them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for (h, w), k in zip(sizes, counts):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 8 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat((xy, xy + wh), dim=1)
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        rx, ry = wh[:, 0] / 2, wh[:, 1] / 2
        masks = (((xx - cx[:, None, None]) / rx[:, None, None]) ** 2
                 + ((yy - cy[:, None, None]) / ry[:, None, None]) ** 2 <= 1).to(torch.uint8)
        labels = torch.randint(1, num_classes, (k,), generator=g)
        out.append({"boxes": boxes, "labels": labels, "masks": masks})
    return out


def losses_and_grads(model, xs, targets, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One train-mode forward (torch.manual_seed(seed) right before it) and backward of the summed losses ->
    (losses, {parameter name: gradient})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = model(xs, [dict(t) for t in targets])
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def in_minseg_names(ref, ours, name: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors keyed by torchvision parameter names (gradients, requires_grad flags) -> keyed by the minseg
    parameter names, renamed by the checkpoint converter (the other entries: the reference's own state)."""
    converted = minseg.convert("torchvision", {**ref.state_dict(), **values}, arch=name)
    return {n: converted[n] for n, _ in ours.named_parameters()}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def sgd_steps(model, batches, seed: int, lr: float = 0.02, steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """`steps` SGD steps (momentum 0.9, weight decay 1e-4, torchvision's reference recipe) -> losses per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    history = []
    for step in range(steps):
        xs, targets = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(seed + step)
        losses = model(xs, [dict(t) for t in targets])
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.detach() for k, v in losses.items()})
    return history
