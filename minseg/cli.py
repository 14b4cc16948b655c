"""minseg's command line: list, convert, predict, parity, bench. `minseg CMD --help` for each.

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
    from minseg.weights import save_weights

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise UsageError(f"{src}: no such file")
    if dst.suffix != ".safetensors":
        raise UsageError(f"{dst}: the output must end in .safetensors")
    if dst.exists() and dst.resolve() == src.resolve():
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
    import minseg
    from minseg.visualize import save_prediction

    images = [Path(p) for p in args.images]
    for p in images:
        if not p.is_file():
            raise UsageError(f"{p}: no such image file")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"{args.weights}: no such weights file")
    device = _usable_device(args.device)
    model = minseg.create_model(args.model, weights=args.weights).to(device)
    out_dir = Path(args.out)
    for path in images:
        (result,) = model.predict([str(path)])
        out_dir.mkdir(parents=True, exist_ok=True)  # once there is something to write
        for written in save_prediction(args.model, path, result, out_dir, args.score_threshold):
            print(written)
    return 0


def cmd_download(args) -> int:
    from minseg.download import download

    for name in args.names:
        print(download(name, manifest=args.manifest, force=args.force))
    return 0


def cmd_parity(args) -> int:
    from minseg_ref.parity import format_table, run

    rows = run(args.model or None)
    print(format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


def cmd_bench(args) -> int:
    from minseg_ref.bench import format_table, run
    if args.train:  # one training step (forward, loss, backward, SGD) instead of a forward: minseg_ref/bench_train.py
        from minseg_ref.bench_train import run

    rows = run(args.model or None, device=args.device, ops=args.ops, repeats=args.repeats)
    print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minseg", description="Readable segmentation models, proven equal to the originals.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the model names")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("convert", help="convert an original's checkpoint to a minseg .safetensors file")
    p.add_argument("--from", dest="source", required=True, choices=["torchvision", "smp", "yolact", "detectron2"])
    p.add_argument("--arch", required=True, help="minseg model name (see `minseg list`)")
    p.add_argument("input", help="the original's checkpoint (.pth, .pt, .pkl)")
    p.add_argument("output", help="where to write the .safetensors file (written atomically)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="fetch an official checkpoint, verify its hash, convert and cache it")
    p.add_argument("names", nargs="+", help="model names (see weights/manifest.json)")
    p.add_argument("--manifest", help="another manifest file (default: weights/manifest.json)")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("predict", help="run a model on images; writes overlay PNGs and JSON")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", help="minseg .safetensors (random init when omitted)")
    p.add_argument("--out", default="out", help="output directory (default: ./out)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this (JSON lists all)")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("parity", help="every model against its original: one table; exit 1 if any fails")
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="time minseg against the original on the same weights and input")
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ops", action="store_true", help="also time the operators (RoIAlign, NMS) against torchvision.ops")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    p.add_argument("--train", action="store_true", help="time one training step of fcn_*, deeplabv3_*, unet_resnet34")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minseg.errors import CheckpointError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"minseg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # network or disk trouble, e.g. urllib.error.URLError
        print(f"minseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"minseg {args.command}: error: {e.name} is needed for this command (pip install -e '.[test]')", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
