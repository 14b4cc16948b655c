"""Parity of yolact_resnet50 against outputs recorded by running dbolya/yolact (shared/parity/yolact_resnet50).

The synthetic checkpoint is rebuilt from the fixture's keys.tsv with the shared recipe (synth.py, overrides from
meta.json), written the way the original writes weights (torch.save of the plain state dict), converted with
minseg.convert("yolact", ...) and run on the recorded inputs. Every recorded stage is compared.

Verdict (common.py): float stages within TOLERANCE relative to their scale, discrete stages identical up to the
measured allowances(). Other CPUs run other conv blockings and another exp (MKL picks its own code path per CPU):
float32 rounding, ~1e-6 relative. canary() re-runs the prediction head, the protonet and Detect from the recording's
own inputs; where those are bitwise, this machine has the recording's kernels and every stage must be bitwise.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import minseg
from minseg.ops.yolact_boxes import crop_masks
from minseg_ref.common import (Allowance, ParityRow, Stage, allowance_table, compare_stage, failures, fixture_dir,
                               fixture_verdict, load_synth, match_near_ties, print_fixture_report)

FIXTURE = "yolact_resnet50"
ORIGINAL = "dbolya/yolact fixture"
TOLERANCE = 1e-5  # max rel diff per float stage under other CPU kernels (the contract's; measured on AVX-512: 4.5e-6)
BAND = 1e-5       # a float within BAND (relative to its scale) of a threshold may fall on either side of it
POST_SIZES = {"post640x480": (480, 640), "post160x120": (120, 160)}  # (h, w)


def load_fixture(name: str = FIXTURE) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(recorded tensors, meta.json, folder); FileNotFoundError naming the place looked in when absent."""
    from safetensors.torch import load_file

    folder = fixture_dir(name)
    return load_file(str(folder / "fixture.safetensors")), json.loads((folder / "meta.json").read_text()), folder


def synthetic_state(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The original's state dict with the fixture's synthetic weights (keys.tsv + synth.py recipe + overrides)."""
    synth = load_synth()
    overrides = {suffix: tuple(v) for suffix, v in meta.get("overrides", {}).items()}
    return synth.synth_state(synth.read_keys(folder / "keys.tsv"), meta.get("base_seed", 0), overrides)


def build_model(arch: str = FIXTURE, state: dict | None = None):
    """minseg model loaded from the fixture's synthetic checkpoint, saved to a temp file as the original saves it."""
    _, meta, folder = load_fixture()
    if state is None:
        state = synthetic_state(folder, meta)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "yolact_synthetic.pth"
        load_synth().write_checkpoint(state, meta["checkpoint_format"], path)
        converted = minseg.convert("yolact", path, arch=arch)
    model = minseg.create_model(arch)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def unpack_masks(packed: torch.Tensor, width: int) -> torch.Tensor:
    """The fixture's numpy.packbits(masks, axis=-1) -> Tensor[K, H, width] bool."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=width).astype(bool))


def postprocessed_pairs(prefix: str, ours: dict[str, torch.Tensor], fx: dict, w: int, full_masks: bool,
                        name: str | None = None) -> dict:
    """The recorded postprocess outputs vs ours: classes, scores, int boxes, mask pixel counts (and full masks)."""
    name = name or prefix
    pairs = {
        f"{name}.classes": (ours["labels"], fx[f"{prefix}.classes"]),
        f"{name}.scores": (ours["scores"], fx[f"{prefix}.scores"]),
        f"{name}.boxes": (ours["boxes"].long(), fx[f"{prefix}.boxes"]),  # the original truncates with .long()
        f"{name}.mask_sums": (ours["masks"].sum((1, 2)), fx[f"{prefix}.mask_sums"]),
    }
    if full_masks:
        pairs[f"{name}.masks"] = (ours["masks"], unpack_masks(fx[f"{prefix}.masks_packbits"], w))
    return pairs


@torch.no_grad()
def stage_pairs(model, fx: dict[str, torch.Tensor], outputs: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{stage name: (minseg, recorded)} for every stage the fixture holds; the network outputs of both cases are
    left in `outputs` ("tensor", "image"; "tensor.levels": P3..P7) when given."""
    outputs = {} if outputs is None else outputs
    captured = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: captured.update(backbone=o)),
             model.fpn.register_forward_hook(lambda m, i, o: captured.update(fpn=o))]
    try:
        out = model(fx["tensor.x"])
    finally:
        for h in hooks:
            h.remove()
    pairs = {}
    for name in ("C3", "C4", "C5"):
        c = captured["backbone"][name.lower()]
        pairs[f"tensor.{name}.first16ch"] = (c[:, :16], fx[f"tensor.{name}.first16ch"])
        pairs[f"tensor.{name}.mean_per_channel"] = (c.double().mean(dim=(0, 2, 3)).float(),  # recorded in float64
                                                 fx[f"tensor.{name}.mean_per_channel"])
        pairs[f"tensor.{name}.absmax_per_channel"] = (c.abs().amax(dim=(0, 2, 3)), fx[f"tensor.{name}.absmax_per_channel"])
    for i, p in enumerate(captured["fpn"]):
        pairs[f"tensor.P{i + 3}"] = (p, fx[f"tensor.P{i + 3}"])
    for key in ("loc", "conf", "mask", "priors", "proto"):
        pairs[f"tensor.{key}"] = (out[key], fx[f"tensor.{key}"])
    outputs["tensor"], outputs["tensor.levels"] = out, captured["fpn"]
    (det,) = model.detect(out)
    order = tie_order(det, fx, "tensor")
    pairs.update(detection_pairs("tensor.det", rows(det, order), fx))
    for prefix, (h, w) in POST_SIZES.items():
        (post,) = model.postprocess(out, [(h, w)])
        post = rows(post, order)
        pairs.update(postprocessed_pairs(f"tensor.{prefix}", post, fx, w, full_masks=f"tensor.{prefix}.masks_packbits" in fx))

    # the image path of eval.py --image: preprocess, network, Detect, postprocess at the image's own size
    rgb = fx["image.rgb"].numpy()
    batch = model.preprocess(rgb)
    pairs["image.batch"] = (batch, fx["image.batch"])
    out = model(batch)
    outputs["image"] = out
    (det,) = model.detect(out)
    order = tie_order(det, fx, "image")
    pairs.update(detection_pairs("image.det", rows(det, order), fx))
    (post,) = model.postprocess(out, [rgb.shape[:2]])
    post = rows(post, order)
    pairs.update(postprocessed_pairs("image", post, fx, rgb.shape[1], full_masks=True))
    (predicted,) = model.predict(rgb)
    predicted = rows(predicted, order)
    pairs.update(postprocessed_pairs("image", predicted, fx, rgb.shape[1], full_masks=True, name="image.predict"))
    return pairs


def tie_order(det: dict[str, torch.Tensor], fx: dict, case: str) -> torch.Tensor:
    """Our detections in the recording's order where they differ only by swaps of scores within BAND."""
    return match_near_ties(det["boxes_rel"], det["scores"], fx[f"{case}.det.box"], BAND)


def rows(out: dict[str, torch.Tensor], order: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[order] if len(v) == len(order) else v for k, v in out.items()}


def detection_pairs(prefix: str, det: dict[str, torch.Tensor], fx: dict) -> dict:
    return {f"{prefix}.box": (det["boxes_rel"], fx[f"{prefix}.box"]),
            f"{prefix}.class": (det["labels"], fx[f"{prefix}.class"]),
            f"{prefix}.score": (det["scores"], fx[f"{prefix}.score"]),
            f"{prefix}.mask": (det["coeffs"], fx[f"{prefix}.mask"])}


STAGES = (  # every recorded stage, in stage_pairs() order
    [f"tensor.{c}.{s}" for c in ("C3", "C4", "C5") for s in ("first16ch", "mean_per_channel", "absmax_per_channel")]
    + [f"tensor.P{i}" for i in range(3, 8)]
    + [f"tensor.{k}" for k in ("loc", "conf", "mask", "priors", "proto")]
    + [f"tensor.det.{k}" for k in ("box", "class", "score", "mask")]
    + [f"tensor.post640x480.{k}" for k in ("classes", "scores", "boxes", "mask_sums")]
    + [f"tensor.post160x120.{k}" for k in ("classes", "scores", "boxes", "mask_sums", "masks")]
    + ["image.batch"] + [f"image.det.{k}" for k in ("box", "class", "score", "mask")]
    + [f"{p}.{k}" for p in ("image", "image.predict") for k in ("classes", "scores", "boxes", "mask_sums", "masks")]
)


def report(pairs: dict) -> list[Stage]:
    return [compare_stage(name, ours, expected) for name, (ours, expected) in pairs.items()]


def run_report(model=None, fx: dict | None = None, outputs: dict | None = None) -> list[Stage]:
    """Every stage compared in this process, with whatever CPU kernels torch picks here."""
    torch.set_num_threads(2)  # the fixture was recorded with 2 threads (conv/GEMM reductions depend on it)
    fx = fx if fx is not None else load_fixture()[0]
    return report(stage_pairs(model if model is not None else build_model(), fx, outputs))


# ---------------------------------------------------------------------------------------------------------------------
# the canary: does this machine compute the recording's numbers bitwise?

@torch.no_grad()
def canary(model, fx: dict) -> tuple[bool, str]:
    """(True, "") when the recording's own P3..P7 through the prediction head and the protonet, and its own network
    outputs through Detect (the exp of the box decoding), reproduce the recorded tensors bitwise; else (False, the
    first recorded step that differs). Convs, softmax, tanh and exp are the kernels that vary between CPUs."""
    levels = [fx[f"tensor.P{i}"] for i in range(3, 8)]
    loc, conf, mask = zip(*(model.head(p) for p in levels))
    outputs = {k: fx[f"tensor.{k}"] for k in ("loc", "conf", "mask", "priors", "proto")}
    steps = {"prediction head conv (tensor.loc)": (torch.cat(loc, 1), fx["tensor.loc"]),
             "softmax (tensor.conf)": (torch.cat(conf, 1).softmax(-1), fx["tensor.conf"]),
             "tanh (tensor.mask)": (torch.cat(mask, 1), fx["tensor.mask"]),
             "protonet conv (tensor.proto)": (model.protonet(levels[0]), fx["tensor.proto"]),
             "box decoding exp (tensor.det.box)": (model.detect(outputs)[0]["boxes_rel"], fx["tensor.det.box"])}
    for step, (ours, recorded) in steps.items():
        if not torch.equal(ours, recorded):
            return False, f"canary: {step} not bitwise from the recorded input"
    return True, ""


# ---------------------------------------------------------------------------------------------------------------------
# allowances: discrete values decided by a float within BAND of a threshold, counted on the recording

@torch.no_grad()
def soft_masks(det: dict[str, torch.Tensor], proto: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The mask probabilities Tensor[K, h, w] that postprocess thresholds at 0.5 (models/yolact.py instances())."""
    masks = crop_masks(torch.sigmoid(proto @ det["coeffs"].t()), det["boxes_rel"])  # (S, S, K)
    return F.interpolate(masks.permute(2, 0, 1)[None], (h, w), mode="bilinear", align_corners=False)[0]


def near_integer(values: torch.Tensor, band: float, sizes: torch.Tensor) -> int:
    """How many of `values` (pixel coordinates, clamped to 0..sizes before truncation) lie within `band` of an
    integer their truncation could fall either side of (not 0: clamped or truncated, it is 0 either way)."""
    v = values.double()
    inside = (v > 0.5) & (v < sizes + band)
    return int((inside & ((v - v.round()).abs() < band)).sum())


def near_ties(scores: torch.Tensor, band: float) -> int:
    """How many adjacent pairs of descending `scores` are closer than `band` (their order could go either way)."""
    return int((scores[:-1] - scores[1:] < band).sum())


@torch.no_grad()
def allowances(model, fx: dict, outputs: dict) -> dict[str, Allowance]:
    """The allowance table, measured: per discrete stage, how many of its values are decided by a float within BAND
    of a threshold (a score tie, a candidate near conf_thresh, a box coordinate near an integer, a mask probability
    near 0.5). Those values may differ from the recording; every other value must be identical. Scores and boxes
    are the recording's; mask probabilities are minseg's, from `outputs` (stage_pairs'; the recording keeps only
    thresholded masks)."""
    fg = fx["tensor.conf"][0, :, 1:].max(1).values
    near_conf = int(((fg - model.cfg.conf_thresh).abs() < BAND).sum())
    image_size = tuple(fx["image.rgb"].shape[:2])
    cases = [(f"tensor.{prefix}", "tensor", size) for prefix, size in POST_SIZES.items()]
    table = {}
    for name, case, (h, w) in cases + [("image", "image", image_size), ("image.predict", "image", image_size)]:
        scores = fx[f"{case}.det.score"]
        ties = near_ties(scores, BAND)
        # a candidate near conf_thresh matters only when the output is not full or ends near conf_thresh: else it
        # scores below every kept detection, so it can neither enter nor suppress one (Fast NMS suppresses downwards)
        full = len(scores) == model.cfg.max_detections and scores[-1] >= model.cfg.conf_thresh + BAND
        entering = 0 if full else near_conf
        table[f"{name}.classes"] = Allowance(entering, f"{near_conf} candidates within {BAND:g} of conf_thresh, "
                                             f"{entering} able to reach the output; {ties} adjacent scores within "
                                             f"{BAND:g} (rows re-matched)")
        sizes = torch.tensor([w, h, w, h])
        table[f"{name}.boxes"] = Allowance(near_integer(fx[f"{case}.det.box"] * sizes, BAND * max(h, w), sizes),
                                          f"box coordinates within {BAND:g} x image side of an integer (truncated)")
        (det,) = model.detect(outputs[case])
        near_half = int(((soft_masks(det, outputs[case]["proto"][0], h, w) - 0.5).abs() < BAND).sum())
        table[f"{name}.mask_sums"] = Allowance(min(near_half, len(det["labels"])), "masks holding such a pixel")
        table[f"{name}.masks"] = Allowance(near_half, f"mask probabilities within {BAND:g} of 0.5")
    return {stage: a for stage, a in table.items() if stage in STAGES}



def check() -> ParityRow:
    torch.set_num_threads(2)
    return fixture_verdict(FIXTURE, ORIGINAL, build_model(), load_fixture()[0], run_report, canary, allowances,
                           TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------------
# the other variants: no recorded outputs, so structure only, from the key lists the spec (section 5.2) describes

def bn_keys(prefix: str, c: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"{prefix}.{n}", (c,), "float32") for n in ("weight", "bias", "running_mean", "running_var")] + \
           [(f"{prefix}.num_batches_tracked", (), "int64")]


def conv_keys(name: str, cout: int, cin: int, k: int, bias: bool = True) -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"{name}.weight", (cout, cin, k, k), "float32")] + ([(f"{name}.bias", (cout,), "float32")] if bias else [])


def resnet_keys(blocks: tuple[int, ...]) -> list:
    """backbone.py ResNetBackbone: `layers` (created first) then the stem; downsample in block 0 of every stage."""
    keys, inplanes = [], 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for i in range(n):
            p = f"backbone.layers.{stage}.{i}"
            keys += conv_keys(f"{p}.conv1", planes, inplanes, 1, False) + bn_keys(f"{p}.bn1", planes)
            keys += conv_keys(f"{p}.conv2", planes, planes, 3, False) + bn_keys(f"{p}.bn2", planes)
            keys += conv_keys(f"{p}.conv3", planes * 4, planes, 1, False) + bn_keys(f"{p}.bn3", planes * 4)
            if i == 0:
                keys += conv_keys(f"{p}.downsample.0", planes * 4, inplanes, 1, False)
                keys += bn_keys(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return keys + conv_keys("backbone.conv1", 64, 3, 7, False) + bn_keys("backbone.bn1", 64)


def darknet_keys() -> list:
    """backbone.py DarkNetBackbone: `layers` (each a stride-2 conv layer then blocks of conv1/conv2), then _preconv."""
    keys, cin = [], 32
    for stage, n in enumerate((1, 2, 8, 8, 4)):
        p = f"backbone.layers.{stage}"
        keys += conv_keys(f"{p}.0.0", cin * 2, cin, 3, False) + bn_keys(f"{p}.0.1", cin * 2)
        cin *= 2
        for i in range(1, n + 1):
            keys += conv_keys(f"{p}.{i}.conv1.0", cin // 2, cin, 1, False) + bn_keys(f"{p}.{i}.conv1.1", cin // 2)
            keys += conv_keys(f"{p}.{i}.conv2.0", cin, cin // 2, 3, False) + bn_keys(f"{p}.{i}.conv2.1", cin)
    return keys + conv_keys("backbone._preconv.0", 32, 3, 3, False) + bn_keys("backbone._preconv.1", 32)


def yolact_keys(backbone: str) -> list[tuple[str, tuple[int, ...], str]]:
    """The original's Yolact().state_dict() keys, as spec section 5.2 describes them: the backbone, proto_net, fpn,
    the shared prediction_layers.0 and semantic_seg_conv."""
    keys = darknet_keys() if backbone == "darknet53" else resnet_keys({"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}[backbone])
    for i in (0, 2, 4, 8):
        keys += conv_keys(f"proto_net.{i}", 256, 256, 3)
    keys += conv_keys("proto_net.10", 32, 256, 1)
    c3, c4, c5 = (256, 512, 1024) if backbone == "darknet53" else (512, 1024, 2048)
    for i, cin in enumerate((c5, c4, c3)):
        keys += conv_keys(f"fpn.lat_layers.{i}", 256, cin, 1)
    for name in ("pred_layers.0", "pred_layers.1", "pred_layers.2", "downsample_layers.0", "downsample_layers.1"):
        keys += conv_keys(f"fpn.{name}", 256, 256, 3)
    keys += conv_keys("prediction_layers.0.upfeature.0", 256, 256, 3)
    for name, cout in (("bbox_layer", 12), ("conf_layer", 243), ("mask_layer", 96)):
        keys += conv_keys(f"prediction_layers.0.{name}", cout, 256, 3)
    return keys + conv_keys("semantic_seg_conv", 80, 256, 1)


def meta_state(keys) -> dict[str, torch.Tensor]:
    """Shapes without storage: enough for structural checks of large checkpoints."""
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype in keys}


VARIANTS = {  # arch: (backbone, spec section 0: state_dict entries, parameters incl. semantic_seg_conv, input, priors)
    "yolact_resnet50": ("resnet50", 354, 31_164_943, 550, 19248),
    "yolact_resnet101": ("resnet101", 660, 50_157_071, 550, 19248),
    "yolact_im700": ("resnet101", 660, 50_157_071, 700, 30963),
    "yolact_darknet53": ("darknet53", 348, 47_783_087, 550, 19248),
}


def structure_problems(arch: str) -> list[str]:
    """Every key of the original's checkpoint renamed or dropped by a named rule, the spec's entry and parameter
    counts, the original's output shapes (a meta-device forward: no memory, no time). [] when all hold."""
    backbone, entries, params, size, priors = VARIANTS[arch]
    keys = yolact_keys(backbone)
    with torch.device("meta"):
        model = minseg.create_model(arch)
        out = model(torch.empty(1, 3, size, size))
    converted = minseg.convert("yolact", meta_state(keys), arch=arch)
    checks = {
        f"{entries} checkpoint entries": len(keys) == entries,
        "every entry converted": converted.keys() == model.state_dict().keys() and len(converted) == entries,
        f"{params:,} parameters": sum(p.numel() for p in model.parameters()) == params,
        f"{priors} priors": out["loc"].shape == (1, priors, 4) and out["priors"].shape == (priors, 4),
        "proto at 1/4": out["proto"].shape == (1, size // 4 + 1, size // 4 + 1, 32),
    }
    return [name for name, ok in checks.items() if not ok]


def structure_check(arch: str) -> ParityRow:
    problems = structure_problems(arch)
    _, entries, params, *_ = VARIANTS[arch]
    detail = f"{entries} keys converted, {params:,} params as the original; no recorded outputs of it, so no numeric claim" \
        if not problems else f"FAIL: {', '.join(problems)}"
    return ParityRow(arch, f"dbolya/yolact {arch} key list", float("nan"), float("nan"), not problems, detail,
                     checks="structure only")


CHECKS = {FIXTURE: (ORIGINAL, check)}
CHECKS.update({arch: (f"dbolya/yolact {arch} key list", lambda arch=arch: structure_check(arch))
               for arch in VARIANTS if arch != FIXTURE})

if __name__ == "__main__":  # every stage, the canary and the allowance table: a closer look than the table's row
    torch.set_num_threads(2)
    print_fixture_report(build_model(), load_fixture()[0], run_report, canary, allowances)
