"""minseg's command line: list, convert, predict, train, eval, export, parity, bench. `minseg CMD --help` for each.

Bad input (missing file, wrong format, wrong architecture, corrupt or hostile checkpoint, unreadable
image) ends with exit status 2 and one line on stderr naming the problem; no output file is left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit 2."""


def cmd_list(args) -> int:
    import minseg

    for name in minseg.list_models():
        print(name)
    return 0


def cmd_convert(args) -> int:
    from minseg.convert import convert_with_overrides
    from minseg.files import same_file
    from minseg.weights import save_weights

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise UsageError(f"{src}: no such file")
    if dst.suffix != ".safetensors":
        raise UsageError(f"{dst}: the output must end in .safetensors")
    if same_file(dst, src):
        raise UsageError(f"{dst}: refusing to overwrite the input")
    if not dst.parent.is_dir():
        raise UsageError(f"{dst.parent}: no such directory")
    state, overrides = convert_with_overrides(args.source, src, arch=args.arch)
    save_weights(state, dst, arch=args.arch, source=args.source, overrides=overrides)
    print(f"{src} -> {dst}: {args.arch}, {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
    return 0


def _usable_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here")
    return device


def cmd_predict(args) -> int:
    """Every check first (files, output names, each image readable), then all outputs or none: they are written
    to temp files and renamed into place only when every image has been predicted."""
    import minseg
    from minseg.files import OutputBatch, plan_outputs
    from minseg.image import load_rgb
    from minseg.visualize import prediction_paths, save_prediction

    images = [Path(p) for p in args.images]
    for p in images:
        if not p.is_file():
            raise UsageError(f"{p}: no such image file")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"{args.weights}: no such weights file")
    out_dir = Path(args.out)
    inputs = images + ([Path(args.weights)] if args.weights is not None else [])
    plan_outputs([(p, prediction_paths(args.model, p, out_dir)) for p in images], inputs)
    for p in images:
        load_rgb(p)  # an unreadable image stops the run before anything is computed or written
    device = _usable_device(args.device)
    model = minseg.create_model(args.model, weights=args.weights).to(device)
    made_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path, written = images[0], []
    try:
        with OutputBatch() as batch:
            for i, path in enumerate(images):
                (result,) = model.predict([str(path)])
                written.append(save_prediction(args.model, path, result, out_dir, args.score_threshold,
                                               weights=args.weights, batch=batch))
                if i == 0 and args.weights is None:  # after the first success, so that a refused input stays one line
                    print(f"minseg predict: note: no --weights, so {args.model} runs on random init and its output "
                          f"means nothing (see `minseg download` and `minseg convert`)", file=sys.stderr)
    except BaseException as e:
        if made_dir:
            _remove_if_empty(out_dir)
        if isinstance(e, (ValueError, TypeError)):
            raise UsageError(f"{path}: {_first_line(e)} (nothing written)") from None
        raise
    for path, paths in zip(images, written):  # every output is in place now
        print(f"{path}: {json.loads(paths[-1].read_text())['summary']}", file=sys.stderr)
        for w in paths:
            print(w)
    return 0


def cmd_export(args) -> int:
    import time

    import minseg
    from minseg.export import save
    from minseg.files import same_file

    out = Path(args.output)
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"{args.weights}: no such weights file")
    if args.weights is not None and same_file(out, Path(args.weights)):
        raise UsageError(f"{out}: refusing to overwrite the input")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory")
    model = minseg.create_model(args.model, weights=args.weights)
    start = time.perf_counter()
    save(model, out, format=args.format)
    print(f"{args.model} -> {out} ({args.format}, {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _first_line(error: BaseException, limit: int = 1000) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_download(args) -> int:
    from minseg.download import cached_record, download

    if args.sha256 and len(args.names) > 1:
        raise UsageError("--sha256 pins one file: give one model name with it")
    for name in args.names:
        path = download(name, manifest=args.manifest, force=args.force, sha256=args.sha256)
        record = cached_record(name) or {}
        print(f"{name}: checked by {record.get('check', '?')}; sha256 of the original {record.get('source_sha256', '?')}",
              file=sys.stderr)
        print(path)
    return 0


def streamer(header: str, format_row):
    """on_row for a table printed row by row: the header comes with the first row (so that a refused
    request prints only its error)."""
    pending = [header]

    def show(row) -> None:
        if pending:
            print(pending.pop(), flush=True)
        print(format_row(row), flush=True)

    return show


def _model_option(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value): the value as an int, a float, a bool (true/false) or else the text itself."""
    key, eq, value = text.partition("=")
    if not eq or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def cmd_train(args) -> int:
    """The run lives in minseg/training/run.py; here only the options become its Settings."""
    from minseg.training.run import Settings, train

    _usable_device(args.device)
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "func", "version")}
    settings["options"] = dict(settings["options"]) if settings["options"] else None
    train(Settings(**settings))
    return 0


def cmd_parity(args) -> int:
    from minseg_ref.parity import FOOTER, format_header, format_row, run

    rows = run(args.model or None, on_row=streamer(format_header(), format_row))  # each row as it finishes
    print(FOOTER)
    return 0 if all(r.passed for r in rows) else 1


def cmd_bench(args) -> int:
    from minseg_ref import bench as table
    run = table.run
    if args.train:  # one training step (forward, loss, backward, SGD) instead of a forward: minseg_ref/bench_train.py
        from minseg_ref.bench_train import run
    if args.data:  # the loader against the training step and eval, images/s: minseg_ref/bench_data.py
        from minseg_ref import bench_data as table
        run = table.run

    rows = run(args.model or None, device=args.device, ops=args.ops, repeats=args.repeats,
               on_row=streamer(table.format_header(), table.format_row))  # each row as it is measured
    print(table.format_footer(rows))
    return 0


def cmd_eval(args) -> int:
    from minseg.evaluate import main

    return main(args)


class ShowVersion(argparse.Action):
    """--version, reading the version only when asked (minseg.weights loads torch)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from minseg.weights import VERSION

        print(f"minseg {VERSION}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minseg", description="Readable segmentation models, proven equal to the originals.")
    parser.add_argument("--version", action=ShowVersion, help="print minseg's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the model names", description="Print the model names, one a line.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("convert", help="convert an original's checkpoint to a minseg .safetensors file")
    p.add_argument("--from", dest="source", required=True, choices=["torchvision", "smp", "yolact", "detectron2"],
                   help="which original wrote the checkpoint")
    p.add_argument("--arch", required=True, help="minseg model name (see `minseg list`)")
    p.add_argument("input", help="the original's checkpoint (.pth, .pt, .pkl)")
    p.add_argument("output", help="where to write the .safetensors file (written atomically; an existing file is replaced)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="fetch an official checkpoint, verify its hash, convert and cache it")
    p.add_argument("names", nargs="+", help="model names (see weights/manifest.json)")
    p.add_argument("--manifest", help="another manifest file (default: weights/manifest.json)")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--sha256", metavar="HEX", help="the original file's full sha256 (64 hex digits) to check, "
                   "instead of the manifest's hash (detectron2's names carry only a 24-bit md5 prefix)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("predict", help="run a model on images; writes overlay PNGs and JSON",
                       description="Run a model on images: for each, OUT/<stem>.<model>.png (the overlay) and .json "
                                   "(classes, detections or segments, and the weights used). A one-line summary per "
                                   "image goes to stderr, the written paths to stdout.")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see `minseg list`)")
    p.add_argument("--weights", metavar="FILE", help="minseg .safetensors from `minseg convert` or `minseg download` "
                   "(without it the model runs on random init, and says so)")
    p.add_argument("--out", default="out", metavar="DIR", help="output directory (default: ./out); existing "
                   "outputs of the same names are replaced, all at once when every image is done (nothing is written if one fails)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this (JSON lists all)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train", help="train or fine-tune a model on a dataset folder (one process, or many under torchrun)",
                       description="Train with the original's optimiser, schedule and augmentation. --out receives "
                                   "last.safetensors, state.pt (to --resume), log.jsonl and loss.png, written "
                                   "atomically; under `torchrun --nproc_per_node N -m minseg train ...` the run is "
                                   "data-parallel (DDP) and rank 0 writes.")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see `minseg list`)")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (semantic, Pascal VOC, COCO instances or panoptic)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (refused if it holds a run, unless --resume)")
    p.add_argument("--weights", metavar="FILE", help="start from a minseg .safetensors, or 'official' (default: random init)")
    p.add_argument("--num-classes", type=_positive_int, metavar="C", help="classes of the model (default: the weights', "
                   "else the dataset's); another number than the weights' re-initialises the class layers")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, help="passes over the data (default: the original's)")
    length.add_argument("--steps", type=_positive_int, help="optimiser steps")
    p.add_argument("--batch-size", type=_positive_int, default=2, help="images per process and step (default 2)")
    p.add_argument("--lr", type=float, help="base learning rate (default: the original's, scaled to the global batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and augmentation (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (each process its LOCAL_RANK's GPU)")
    p.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast on CPU, fp16 + grad scaler on CUDA")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (its settings) up to --steps/--epochs")
    p.add_argument("--split", help="the dataset's split (VOC list, COCO instances_SPLIT.json)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0: in the training process)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on the images as they are")
    p.add_argument("--image-size", type=_positive_int, metavar="S", help="the recipe's base size (semantic 520, "
                   "U-Net crop 320, Mask R-CNN / Panoptic FPN shorter side 800; YOLACT's input side max_size, 550)")
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm as a frozen affine map (running statistics, no gradient)")
    p.add_argument("--no-dropout", dest="dropout", action="store_false", help="dropout layers off (eval mode)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm (CUDA only, a torch limit)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="steps between log lines (default 10)")
    p.add_argument("--save-every", type=_positive_int, default=1000, help="steps between saves (default 1000; also at the end)")
    p.add_argument("--check-replicas", action="store_true", help="under torchrun: stop if the ranks' weights ever differ")
    p.add_argument("--option", dest="options", action="append", type=_model_option, metavar="KEY=VALUE",
                   help="a create_model option of a fresh run (repeatable), e.g. norm=GN freeze_at=0 for Panoptic FPN "
                        "from scratch as detectron2's scratch configs (the model config's fields)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a model's whole inference path (torch.export .pt2 or ONNX)",
                       description="Write the model's inference path, postprocessing included, as a torch.export "
                                   "ExportedProgram (pt2) or an ONNX file; image height and width are dynamic.")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see `minseg list`)")
    p.add_argument("--weights", metavar="FILE", help="minseg .safetensors (default: random init)")
    p.add_argument("--format", required=True, choices=["pt2", "onnx"])
    p.add_argument("output", help="the file to write (atomically)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("parity", help="every model against its original: one table; exit 1 if any fails")
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="time minseg against the original on the same weights and input")
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ops", action="store_true", help="also time the operators (RoIAlign, NMS) against torchvision.ops")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per side (median reported)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--train", action="store_true", help="time one training step (fcn_*, deeplabv3_*, unet_resnet34, maskrcnn_*)")
    what.add_argument("--data", action="store_true", help="images/s of the training loader against the training step, "
                                                          "and of the eval's reads against minseg eval, per family")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="a model's metrics on a dataset: mIoU, COCO box/mask AP, or PQ",
                       description="Evaluate a model on a dataset folder (layout recognised from its contents) and print "
                                   "mIoU and per-class IoU (semantic), COCO box and mask AP (instances; needs "
                                   "pycocotools) or PQ/SQ/RQ (panoptic). Under torchrun each process evaluates a shard; "
                                   "the numbers are those of one process.")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see `minseg list`)")
    p.add_argument("--weights", required=True, metavar="FILE", help="minseg .safetensors (the model's class count "
                   "must match the dataset's categories)")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder: images/ + masks/, Pascal VOC, COCO "
                   "instances or COCO panoptic")
    p.add_argument("--split", help="VOC's ImageSets/Segmentation/SPLIT.txt (default val), COCO's "
                   "annotations/instances_SPLIT.json, or a subfolder")
    p.add_argument("--out", default="out", metavar="DIR", help="write metrics.json (and predictions.json for "
                   "instance models) here (default: ./out), atomically; nothing is written if the run fails")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (default) or cuda (under torchrun: each process the GPU of its LOCAL_RANK)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minseg.errors import CheckpointError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"minseg {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # network or disk trouble, e.g. urllib.error.URLError
        print(f"minseg {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: temp files are already removed on the way out
        print(f"minseg {args.command}: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # exit here, with 130: an interrupt that arrived inside native code can otherwise still end the process
        # by SIGINT after this line (seen as status -2 in about 1 run in 6)
        os._exit(130)
    except ModuleNotFoundError as e:
        print(f"minseg {args.command}: error: {e.name} is needed for this command (pip install -e '.[test]')", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
