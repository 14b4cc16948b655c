"""Dispatched ATen operations and host reads in one forward, minseg beside its original.

A CPU-side view of what limits small-batch GPU inference: every dispatched op that is not a view starts at
least one kernel on a GPU, and every read of a tensor's value by the host (.item(), .tolist(), nonzero,
torch.equal, a boolean mask index) is a host-device synchronisation there. With --gpu-forms, minseg's ops take
the forms they take on GPUs (impl "gpu", see `minseg.ops.forms`), so the count is what a GPU would run; the
originals keep their own code paths (torchvision's roi_align and nms are one kernel each on either device).
Host reads of small tensors that the code makes on the CPU on purpose (thresholds, level scales) are counted
too; the table of sites shows where each read comes from.

    python -m minseg_ref.dispatch_count [--gpu-forms] [--sites N] [MODEL ...]
"""
from __future__ import annotations

import argparse
import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

READ_OPS = {"aten.nonzero.default", "aten.where.default", "aten.equal.default", "aten.masked_select.default",
            "aten._unique2.default", "aten.unique_consecutive.default"}  # the host waits for their shape or value
MASK_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}
READ_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
                torch.Tensor.__bool__, torch.Tensor.__index__}  # not always dispatched on the CPU
VIEWS = {"alias", "as_strided", "chunk", "detach", "diagonal", "empty_like", "empty_strided", "expand", "expand_as",
         "flatten", "lift_fresh", "movedim", "narrow", "permute", "reshape", "select", "slice", "split",
         "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as",
         "_unsafe_view", "_reshape_alias", "empty"}


def _reads_host(func, args, kwargs) -> bool:
    """Whether the op's result shape or value depends on data: the host must wait for the device."""
    name = str(func)
    if name in MASK_INDEXING:  # boolean-mask indexing finds the True positions first
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    if name == "aten.repeat_interleave.Tensor":
        return kwargs.get("output_size") is None
    return name in READ_OPS


def _site(package: str) -> str:
    """file:function of the innermost frame in `package` on the current Python stack."""
    for frame in reversed(traceback.extract_stack(limit=40)):
        if f"/{package}/" in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}"
    return "?"


class Counter(TorchDispatchMode):
    """Counts non-view ATen ops and host reads, by the innermost function of `package` that issued them."""

    def __init__(self, package: str):
        super().__init__()
        self.package = package
        self.ops, self.reads = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.split(".")[1] not in VIEWS:
            self.ops[_site(self.package)] += 1
        if _reads_host(func, args, kwargs or {}):
            self.reads[_site(self.package)] += 1
        return func(*args, **(kwargs or {}))


class ReadCounter(TorchFunctionMode):
    """Counts Tensor.item, .tolist, int(), float(), bool() and index use of tensors into `counter`: on the CPU
    they read memory without dispatching an op, on a GPU each waits for the device."""

    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READ_METHODS:
            self.counter.reads[_site(self.counter.package)] += 1
        return func(*args, **(kwargs or {}))


def count(forward, package: str) -> Counter:
    """Run `forward` once to warm up, then once under the counters."""
    with torch.inference_mode():
        forward()
        counter = Counter(package)
        with ReadCounter(counter), counter:
            forward()
    return counter


def model_forwards() -> dict:
    """model name -> function() -> {"ours": fn, "original": fn (absent where the original cannot run here)}."""
    from minseg_ref import bench, bench_maskrcnn, bench_panoptic, bench_unet, bench_yolact

    table = {name: (lambda name=name: bench.semantic_forwards(name, "cpu")) for name in bench.SEMANTIC}
    table["unet_resnet34"] = lambda: bench_unet.forwards("cpu")
    table.update({name: (lambda name=name: bench_maskrcnn.forwards(name, "cpu")) for name in bench_maskrcnn.NAMES})
    table.update({arch: (lambda arch=arch: bench_yolact.forwards(arch, "cpu")) for arch in bench_yolact.PUBLISHED_FPS})
    table.update({arch: (lambda arch=arch: bench_panoptic.forwards(arch, "cpu"))
                  for arch in bench_panoptic.PUBLISHED_SECONDS})
    return table


ORIGINAL_PACKAGE = {"unet": "segmentation_models_pytorch"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="default: the Mask R-CNN models")
    parser.add_argument("--gpu-forms", action="store_true", help="minseg's ops in the forms they take on GPUs")
    parser.add_argument("--sites", type=int, default=8, help="busiest sites listed per side")
    args = parser.parse_args()
    if args.gpu_forms:
        from minseg.ops import forms

        auto = forms.choose  # this tool alone: every op's "auto" picks its GPU form, whatever the device
        forms.choose = lambda impl, like: auto("gpu" if impl == "auto" else impl, like)
    table = model_forwards()
    for name in args.models or ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]:
        sides = table[name]()
        original_package = ORIGINAL_PACKAGE.get(name.split("_")[0], "torchvision")
        for side, package in [("ours", "minseg"), ("original", original_package)]:
            if side not in sides:
                continue
            c = count(sides[side], package)
            print(f"{name} {side}: {sum(c.ops.values())} ops, {sum(c.reads.values())} host reads")
            for site, n in c.ops.most_common(args.sites):
                print(f"    {n:6d} ops    {site}")
            for site, n in c.reads.most_common(args.sites):
                print(f"    {n:6d} reads  {site}")


if __name__ == "__main__":
    main()
