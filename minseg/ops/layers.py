"""Small layers shared by every family: frozen batch norm, a max pool that keeps no indices, conv helpers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, never trained).

    Two originals compute the same normalisation in two float orders, and parity needs each one:
      arithmetic="affine":     x * scale + shift, scale = w * rsqrt(var + eps)  (torchvision.ops.misc)
      arithmetic="batch_norm": F.batch_norm(x, mean, var, w, b, eps) when x needs no gradient, the affine form
                               when it does (detectron2 layers/batch_norm.py: it picks by x.requires_grad, so in
                               training the frozen stem and res2 take the fused op and res3..res5 the affine one)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, arithmetic: str = "affine"):
        super().__init__()
        if arithmetic not in ("affine", "batch_norm"):
            raise ValueError(f"arithmetic must be 'affine' or 'batch_norm', got {arithmetic!r}")
        self.eps = eps
        self.arithmetic = arithmetic
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, arithmetic: str = "affine") -> FrozenBatchNorm2d:
        """A BatchNorm2d frozen where it stands: its affine and running statistics (detectron2's
        FrozenBatchNorm2d.convert_frozen_batchnorm, for one module)."""
        frozen = cls(bn.num_features, eps=bn.eps, arithmetic=arithmetic)
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, k).copy_(getattr(bn, k).detach())
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # kept: checkpoints written from nn.BatchNorm2d carry this counter; a frozen norm has no use for it
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arithmetic == "batch_norm" and not x.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, arithmetic={self.arithmetic}"


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same state, same training), whose eval forward also traces with a data-dependent batch size
    (torch.export: the RoI heads' norms see as many RoIs as survived NMS). nn.BatchNorm2d's eval path reaches the
    kernel `_native_batch_norm_legit_no_training` through a check for an empty batch that torch.export cannot
    decide; traced, this calls the kernel directly (the same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.track_running_stats or not torch.compiler.is_compiling():
            return super().forward(x)
        return torch.ops.aten._native_batch_norm_legit_no_training(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum or 0.0, self.eps)[0]


def make_norm(kind: str, channels: int, eps: float = 1e-5) -> nn.Module:
    """'bn' -> BatchNorm2d (nn.BatchNorm2d that exports with a data-dependent batch), 'frozen' -> FrozenBatchNorm2d
    (affine), 'frozen_bn' -> FrozenBatchNorm2d via F.batch_norm (detectron2's choice), 'gn' -> GroupNorm(32)."""
    if kind == "bn":
        return BatchNorm2d(channels, eps=eps)
    if kind == "frozen":
        return FrozenBatchNorm2d(channels, eps=eps, arithmetic="affine")
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels, eps=eps, arithmetic="batch_norm")
    if kind == "gn":
        return nn.GroupNorm(32, channels, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected 'bn', 'frozen', 'frozen_bn' or 'gn'")


def set_norm_eps(module: nn.Module, eps: float) -> nn.Module:
    """Set eps on every batch norm (frozen or not) inside `module`; returns it for chaining."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.eps = eps
    return module


class _MaxPoolRecomputingIndices(torch.autograd.Function):
    """max_pool2d whose backward finds the argmax again from the saved input instead of keeping it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.window = (kernel_size, stride, padding)
        return F.max_pool2d(x, kernel_size, stride, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,), (k, s, p) = ctx.saved_tensors, ctx.window
        _, indices = F.max_pool2d(x, k, s, p, return_indices=True)  # the forward's argmax: same input, same op
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [k, k], [s, s], [p, p], [1, 1], False,
                                                                 indices)  # autograd's own call for nn.MaxPool2d
        return grad_x, None, None, None


class MaxPool2d(nn.Module):
    """nn.MaxPool2d(kernel_size, stride, padding): the same values and the same gradients, bit for bit, from a
    backward that keeps no int64 index tensor. nn.MaxPool2d saves its argmax, twice the bytes of its float32
    output (the ResNet stem's: 56 MB for two 800x1088 images, alive through the whole backbone's backward); this
    one saves only its input, which the ReLU before it already keeps for its own backward, and recomputes the
    argmax when its backward runs."""

    def __init__(self, kernel_size: int, stride: int, padding: int = 0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return _MaxPoolRecomputingIndices.apply(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> norm -> ReLU, indexed 0/1/2 like torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 norm: str = "bn", act: bool = True):
        padding = (kernel_size - 1) // 2 * dilation
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, bias=False), make_norm(norm, cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def c2_msra_fill(m: nn.Module) -> None:
    """fvcore nn/weight_init.py c2_msra_fill (Caffe2's MSRAFill): kaiming normal, fan_out, ReLU gain; bias 0."""
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def c2_xavier_fill(m: nn.Module) -> None:
    """fvcore nn/weight_init.py c2_xavier_fill (Caffe2's XavierFill): kaiming uniform with a=1; bias 0."""
    nn.init.kaiming_uniform_(m.weight, a=1)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
