"""Export: a model's whole inference path, postprocessing included, as one torch.export graph or ONNX file.

    program = minseg.export.export_program(model)              # torch.export.ExportedProgram
    minseg.export.save(model, "model.pt2")                      # torch.export.save, written atomically
    minseg.export.save(model, "model.onnx", format="onnx")      # torch.onnx.export(dynamo=True) of that graph

The exported module takes the forward's input and returns its final outputs, for any image height and width:
  fcn_*, deeplabv3_*, unet_*: x Tensor[N, 3, H, W] (N, H, W dynamic) -> the forward's output.
  maskrcnn_*: a list of one Tensor[3, H, W] -> [{"boxes", "labels", "scores", "masks"}] (H, W dynamic).
  panoptic_fpn_*: a list of one {"image": Tensor[3, H, W], "height": int, "width": int} -> [{"instances",
    "sem_seg", "panoptic_seg", "segments_info"}] (H, W over 64 px, height, width dynamic), segments_info as a dict
    of Tensor[S] per field: `panoptic_results` turns it into detectron2's list of dicts, as the forward returns it.
  yolact_*: x Tensor[N, 3, S, S] (S the configured input side: the original resizes every image to it) and each
    image's output size (height, width) -> per image the postprocess() dict (height, width dynamic; N as traced).
The graphs have no Python branch on data: selections give data-dependent sizes (torch.export's unbacked
sizes), NMS's fixpoint is a bounded torch.while_loop (an ONNX Loop), and the eager code is the code traced.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.export import Dim

from minseg.files import atomic_write
from minseg.models.fcn import SegmentationNet
from minseg.heads.panoptic_fusion import segments_info_list
from minseg.models.mask_rcnn import MaskRCNN
from minseg.models.panoptic_fpn import PanopticFPN
from minseg.models.unet import UNet
from minseg.models.yolact import Yolact

FORMATS = ("pt2", "onnx")
MIN_SIDE, MAX_SIDE = 64, 4096  # the input sides an exported program takes (U-Net needs its c5 over 1 px)
PANOPTIC_MIN_SIDE = 65  # Panoptic FPN's smallest side (its p6 over 1 px)


class YolactWithPostprocess(nn.Module):
    """YOLACT's forward then its postprocess as one module: (x Tensor[N, 3, S, S], sizes: N (height, width))
    -> per image {"boxes", "labels", "scores", "masks"} (the contract's "tensor plus output sizes")."""

    def __init__(self, model: Yolact):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        return self.model.postprocess(self.model(x), sizes)


def panoptic_results(results: list[dict]) -> list[dict]:
    """An exported Panoptic FPN's outputs -> the forward's: each segments_info (a dict of tensors in the graph) as
    detectron2's list of dicts. The thin eager step after the program."""
    return [{**r, "segments_info": segments_info_list(r["segments_info"])} for r in results]


def example_inputs(model: nn.Module, height: int = 96, width: int = 128) -> tuple:
    """The inputs export traces with (any values: the sizes are made dynamic): a batch of two images for the dense
    models, a list of one image for Mask R-CNN, YOLACT's square input at its configured size plus (height, width)."""
    g = torch.Generator().manual_seed(0)
    if isinstance(model, MaskRCNN):
        return ([torch.rand(3, height, width, generator=g)],)
    if isinstance(model, PanopticFPN):  # output size unlike the input's: both traced as distinct sizes
        return ([{"image": torch.rand(3, height, width, generator=g) * 255, "height": height + 8, "width": width - 8}],)
    if isinstance(model, Yolact):
        S = model.cfg.max_size
        return (torch.randn(1, 3, S, S, generator=g), [(height, width)])
    if isinstance(model, (SegmentationNet, UNet)):
        return (torch.randn(2, 3, height, width, generator=g),)  # two: a batch of one would fix N to 1
    raise ValueError(f"{type(model).__name__}: no export recipe (fcn_*, deeplabv3_*, unet_*, maskrcnn_*, "
                     f"panoptic_fpn_*, yolact_*)")


def _dynamic_shapes(model: nn.Module, inputs: tuple):
    """Which sizes vary: image height and width everywhere, the batch where the model batches it."""
    H, W = Dim("height", min=MIN_SIDE, max=MAX_SIDE), Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    if isinstance(model, MaskRCNN):
        return ([{1: H, 2: W}],)
    if isinstance(model, PanopticFPN):
        # over 64 px: p6 (stride 64) then has 2 px at least; torch.export takes a size of 1 as a constant
        H, W = Dim("height", min=PANOPTIC_MIN_SIDE, max=MAX_SIDE), Dim("width", min=PANOPTIC_MIN_SIDE, max=MAX_SIDE)
        return ([{"image": {1: H, 2: W}, "height": Dim.DYNAMIC, "width": Dim.DYNAMIC}],)
    if isinstance(model, Yolact):
        # the input is always S x S (the original's FastBaseTransform resizes every image to it); the image's
        # own size is the output size, any ints
        return (None, [(Dim.DYNAMIC, Dim.DYNAMIC)] * len(inputs[1]))
    return ({0: Dim("batch", min=1, max=1024), 2: H, 3: W},)


def export_program(model: nn.Module, inputs: tuple | None = None) -> torch.export.ExportedProgram:
    """model (eval mode is set) -> torch.export.ExportedProgram of its inference path, postprocessing included,
    with dynamic sizes (see the module docstring). `inputs`: what to trace with (default `example_inputs`)."""
    model.eval()
    inputs = example_inputs(model) if inputs is None else inputs
    module = YolactWithPostprocess(model) if isinstance(model, Yolact) else model
    with torch.no_grad():
        return torch.export.export(module, inputs, dynamic_shapes=_dynamic_shapes(model, inputs))


def save(model: nn.Module, path: str | os.PathLike, format: str = "pt2") -> None:
    """Export `model` and write it to `path` atomically: "pt2" (torch.export.save) or "onnx"
    (torch.onnx.export(dynamo=True) of the same program)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    program = export_program(model)
    if format == "pt2":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: the temp file's name does not end in .pt2
                torch.export.save(program, f)

        atomic_write(path, write)
        return
    onnx_program = to_onnx(program)
    atomic_write(path, lambda tmp: onnx_program.save(tmp))


def to_onnx(program: torch.export.ExportedProgram):
    """torch.onnx.export(dynamo=True) of an exported program -> torch.onnx.ONNXProgram. NMS's stable sorts
    (aten.sort.stable, which the exporter lacks) become ONNX TopK over the whole axis, which the ONNX spec orders
    stably (ties: lower index first)."""
    return torch.onnx.export(program, dynamo=True, verbose=False,
                             custom_translation_table={torch.ops.aten.sort.stable: _onnx_stable_sort})


def _onnx_stable_sort(self, *, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """aten::sort.stable as an onnxscript function: TopK of k = the axis's size, sorted."""
    from onnxscript import opset18 as op

    size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    values, indices = op.TopK(self, size, axis=dim, largest=descending, sorted=True)
    return values, indices
