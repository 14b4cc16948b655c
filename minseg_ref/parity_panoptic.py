"""Parity of panoptic_fpn_resnet50 against outputs recorded by running detectron2 (shared/parity/panoptic_fpn_R_50).

The synthetic model-zoo `.pkl` is rebuilt from the fixture's keys.tsv with the shared recipe (synth.py, overrides from
meta.json), converted with minseg.convert("detectron2", ...) and run on both recorded cases: `model` (the network
called directly on a stored BGR tensor) and `predictor` (DefaultPredictor on an RGB image: PIL resize to 800x1067).
Every recorded stage is compared: FPN features, RPN proposals, raw detections, final instances, sem_seg, the
panoptic map and segments_info.

Verdict (common.py): float stages within TOLERANCE relative to their scale, discrete stages identical up to the
measured allowances(). canary() re-runs the sem-seg head and the RPN from the recording's own FPN features; where
those are bitwise, this machine has the recording's kernels and every stage must be bitwise.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import minseg
from minseg.models.panoptic_fpn import detector_postprocess, sem_seg_postprocess
from minseg_ref.common import (Allowance, ParityRow, Stage, allowance_table, compare_stage, failures, fixture_dir,
                               fixture_verdict, load_synth, match_near_ties, print_fixture_report)

FIXTURE = "panoptic_fpn_R_50"
MODEL = "panoptic_fpn_resnet50"
ORIGINAL = "detectron2 fixture"
TOLERANCE = 1e-5  # max rel diff per float stage under other CPU kernels (the contract's; measured on AVX-512: 5.4e-6)
BAND = 1e-5       # a float within BAND (relative to its scale) of a threshold may fall on either side of it
LEVELS = ("p2", "p3", "p4", "p5", "p6")


def load_fixture() -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(recorded tensors, meta.json, folder); FileNotFoundError naming the place looked in when absent."""
    from safetensors.torch import load_file

    folder = fixture_dir(FIXTURE)
    return load_file(str(folder / "fixture.safetensors")), json.loads((folder / "meta.json").read_text()), folder


def read_keys(folder: Path) -> list[tuple[str, tuple[int, ...], str]]:
    return load_synth().read_keys(folder / "keys.tsv")


def r101_keys(r50_keys: list[tuple[str, tuple[int, ...], str]]) -> list[tuple[str, tuple[int, ...], str]]:
    """The panoptic_fpn_R_101 state_dict keys, derived from the R-50 list and spec section 10.3: the same entries in
    the same order, with res4 holding 23 blocks instead of 6 (res4.6..res4.22 shaped like res4.1..res4.5, inserted
    after res4.5). 330 + 17 blocks x 15 entries = 585."""
    out = []
    template = [(k, s, d) for k, s, d in r50_keys if k.startswith("backbone.bottom_up.res4.1.")]
    for key, shape, dtype in r50_keys:
        out.append((key, shape, dtype))
        if key == "backbone.bottom_up.res4.5.conv3.norm.running_var":
            for block in range(6, 23):
                out += [(k.replace("res4.1.", f"res4.{block}.", 1), s, d) for k, s, d in template]
    return out


def synthetic_state(keys, meta: dict) -> dict[str, torch.Tensor]:
    synth = load_synth()
    overrides = {suffix: tuple(v) for suffix, v in meta.get("overrides", {}).items()}
    return synth.synth_state(keys, meta.get("base_seed", 0), overrides)


def convert_synthetic(state: dict[str, torch.Tensor], arch: str = MODEL) -> dict[str, torch.Tensor]:
    """Write `state` as a model-zoo .pkl (the recipe's writer) and convert it the way a user would."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_final_synthetic.pkl"
        load_synth().write_checkpoint(state, "detectron2-pkl", path)
        return minseg.convert("detectron2", path, arch=arch)


def build_model(arch: str = MODEL):
    _, meta, folder = load_fixture()
    keys = read_keys(folder) if arch == MODEL else r101_keys(read_keys(folder))
    model = minseg.create_model(arch)
    model.load_state_dict(convert_synthetic(synthetic_state(keys, meta), arch), strict=True)
    return model.eval()


def match_proposals(ours: torch.Tensor, ours_logits: torch.Tensor, rec: torch.Tensor, rec_logits: torch.Tensor,
                    near: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Our proposals reordered to the recording's order where the two differ only by adjacent swaps of logits
    closer than `near` (the README: near-equal logits trade places under other GEMM rounding). Any other
    difference is left for the comparison to report."""
    if ours.shape != rec.shape:
        return ours, ours_logits
    order = torch.arange(len(ours))
    for i in range(len(ours) - 1):
        a, b = order[i].item(), order[i + 1].item()
        if (ours_logits[a] - ours_logits[b]).abs() < near and \
                (ours[b] - rec[i]).abs().max() < (ours[a] - rec[i]).abs().max() and \
                (ours[a] - rec[i + 1]).abs().max() < (ours[b] - rec[i + 1]).abs().max():
            order[i], order[i + 1] = b, a
    return ours[order], ours_logits[order]


@torch.no_grad()
def run_case(model, fx: dict[str, torch.Tensor], case: str) -> tuple[dict, dict]:
    """Run one recorded case, capturing the intermediate stages; (output dict, captured stages)."""
    captured = {}
    hooks = [model.fpn.register_forward_hook(lambda m, i, o: captured.update(features=o)),
             model.rpn.register_forward_hook(lambda m, i, o: captured.update(proposals=o)),
             model.roi_heads.register_forward_hook(lambda m, i, o: captured.update(raw=o)),
             model.register_forward_pre_hook(lambda m, args: captured.update(image=args[0][0]["image"]))]
    try:
        if case == "model":
            (out,) = model([{"image": fx["model.image"], "height": 120, "width": 168}])
        else:
            (out,) = model.predict(fx["predictor.rgb"].numpy())  # the pre-hook sees the resized BGR tensor
    finally:
        for h in hooks:
            h.remove()
    return out, captured


def follow_recorded_order(fx: dict, case: str, out: dict, cap: dict) -> tuple[dict, dict]:
    """Our detections and panoptic segments in the recording's order where they differ only by swaps of instance
    scores within BAND (rounding can order near-equal scores either way): the raw and final instances re-matched
    row by row (common.match_near_ties), then segment ids relabelled to the recording's segment of the same instance
    (things) or category (stuff). Any other difference is left for the comparison to report."""
    (raw,) = cap["raw"]
    order = match_near_ties(raw["boxes"], raw["scores"], fx[f"{case}.raw.pred_boxes"], BAND)
    if torch.equal(order, torch.arange(len(order))) or len(out["instances"]["scores"]) != len(order):
        return out, cap
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))  # our instance i is now row position[i]
    raw = {k: v[order] for k, v in raw.items()}
    segments = [{**s, "instance_id": int(position[s["instance_id"]])} if s["isthing"] else s
                for s in out["segments_info"]]

    def key(isthing, instance, category) -> tuple[bool, int]:  # a segment is its instance (things) or its category
        return bool(isthing), int(instance) if isthing else int(category)

    recorded_id = {key(i >= 0, i, c): int(r) for r, i, c in zip(
        fx[f"{case}.segments.id"], fx[f"{case}.segments.instance_id"], fx[f"{case}.segments.category_id"])}
    relabel = {s["id"]: recorded_id.get(key(s["isthing"], s.get("instance_id"), s["category_id"]), s["id"])
               for s in segments}
    if sorted(relabel.values()) != sorted(relabel):  # not a permutation of our ids: leave it to the comparison
        relabel = {i: i for i in relabel}
    panoptic = out["panoptic_seg"].clone()
    for ours, theirs in relabel.items():
        panoptic[out["panoptic_seg"] == ours] = theirs
    segments = sorted(({**s, "id": relabel[s["id"]]} for s in segments), key=lambda s: s["id"])
    instances = {k: v[order] for k, v in out["instances"].items()}
    return {**out, "instances": instances, "panoptic_seg": panoptic, "segments_info": segments}, {**cap, "raw": [raw]}


def stage_pairs(fx: dict[str, torch.Tensor], case: str, out: dict, cap: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{stage name: (minseg, recorded)} for every stage of one case, from run_case()'s (output, captured stages)."""
    out, cap = follow_recorded_order(fx, case, out, cap)
    pairs = {}
    if case == "predictor":
        pairs[f"{case}.image"] = (cap["image"], fx[f"{case}.image"])
    for level in LEVELS if f"{case}.features.p2" in fx else ():  # the predictor case records no features
        pairs[f"{case}.features.{level}"] = (cap["features"][level], fx[f"{case}.features.{level}"])
    (proposals,) = cap["proposals"]
    boxes, logits = match_proposals(proposals["boxes"], proposals["scores"],
                                    fx[f"{case}.proposals.boxes"], fx[f"{case}.proposals.objectness_logits"])
    pairs[f"{case}.proposals.boxes"] = (boxes, fx[f"{case}.proposals.boxes"])
    pairs[f"{case}.proposals.objectness_logits"] = (logits, fx[f"{case}.proposals.objectness_logits"])
    (raw,) = cap["raw"]
    pairs[f"{case}.raw.pred_boxes"] = (raw["boxes"], fx[f"{case}.raw.pred_boxes"])
    pairs[f"{case}.raw.scores"] = (raw["scores"], fx[f"{case}.raw.scores"])
    pairs[f"{case}.raw.pred_classes"] = (raw["labels"], fx[f"{case}.raw.pred_classes"])
    pairs[f"{case}.raw.mask_probs"] = (raw["mask_probs"], fx[f"{case}.raw.mask_probs"])
    inst = out["instances"]
    pairs[f"{case}.instances.pred_boxes"] = (inst["boxes"], fx[f"{case}.instances.pred_boxes"])
    pairs[f"{case}.instances.scores"] = (inst["scores"], fx[f"{case}.instances.scores"])
    pairs[f"{case}.instances.pred_classes"] = (inst["labels"], fx[f"{case}.instances.pred_classes"])
    pairs[f"{case}.instances.pred_masks"] = (inst["masks"].to(torch.uint8), fx[f"{case}.instances.pred_masks"])
    if f"{case}.sem_seg" in fx:
        pairs[f"{case}.sem_seg"] = (out["sem_seg"], fx[f"{case}.sem_seg"])
    if f"{case}.sem_seg_argmax" in fx:
        pairs[f"{case}.sem_seg_argmax"] = (out["sem_seg"].argmax(0), fx[f"{case}.sem_seg_argmax"])
    pairs[f"{case}.panoptic_seg"] = (out["panoptic_seg"], fx[f"{case}.panoptic_seg"])
    pairs.update(segment_pairs(case, out, fx))
    return pairs


def segment_pairs(case: str, out: dict, fx: dict) -> dict:
    """segments_info as the fixture stores it: one tensor per field, in list order."""
    segs = out["segments_info"]
    area = [s["area"] if not s["isthing"] else int((out["panoptic_seg"] == s["id"]).sum()) for s in segs]
    fields = {
        "id": torch.tensor([s["id"] for s in segs], dtype=torch.int32),
        "category_id": torch.tensor([s["category_id"] for s in segs], dtype=torch.int64),
        "isthing": torch.tensor([int(s["isthing"]) for s in segs], dtype=torch.uint8),
        "score": torch.tensor([s.get("score", -1.0) for s in segs], dtype=torch.float32),
        "area": torch.tensor(area, dtype=torch.int64),
        "instance_id": torch.tensor([s.get("instance_id", -1) for s in segs], dtype=torch.int64),
    }
    return {f"{case}.segments.{k}": (v, fx[f"{case}.segments.{k}"]) for k, v in fields.items()}


def run_report(model=None, fx: dict | None = None, outputs: dict | None = None) -> list[Stage]:
    """Every stage of both cases compared in this process, with whatever CPU kernels torch picks here; each case's
    (output, captured stages) is left in `outputs` when given."""
    torch.set_num_threads(2)  # the fixture was recorded with 2 threads (conv/GEMM reductions depend on it)
    fx = fx if fx is not None else load_fixture()[0]
    model = model if model is not None else build_model()
    outputs = {} if outputs is None else outputs
    stages = []
    for case in ("model", "predictor"):
        outputs[case] = run_case(model, fx, case)
        stages += [compare_stage(name, a, b) for name, (a, b) in stage_pairs(fx, case, *outputs[case]).items()]
    return stages


# ---------------------------------------------------------------------------------------------------------------------
# the canary: does this machine compute the recording's numbers bitwise?

@torch.no_grad()
def canary(model, fx: dict) -> tuple[bool, str]:
    """(True, "") when the recording's own FPN features (case `model`) through the sem-seg head and its
    postprocessing, and through the RPN (convs, box decoding exp, top-k, NMS), reproduce the recorded sem_seg and
    proposals bitwise; else (False, the first recorded step that differs)."""
    features = {level: fx[f"model.features.{level}"] for level in LEVELS}
    H, W = features["p2"].shape[-2:]
    size = (4 * H, 4 * W)  # the padded input, (320, 448), which is also the unpadded one
    sem = model.sem_seg_head([features[k] for k in ("p2", "p3", "p4", "p5")])[0]
    (proposals,) = model.rpn(features, [size], size)
    steps = {"sem-seg head convs (model.sem_seg)": (sem_seg_postprocess(sem, size, 120, 168), fx["model.sem_seg"]),
             "RPN convs and decoding (model.proposals.boxes)": (proposals["boxes"], fx["model.proposals.boxes"]),
             "RPN logits (model.proposals.objectness_logits)": (proposals["scores"], fx["model.proposals.objectness_logits"])}
    for step, (ours, recorded) in steps.items():
        if not torch.equal(ours, recorded):
            return False, f"canary: {step} not bitwise from the recorded input"
    return True, ""


# ---------------------------------------------------------------------------------------------------------------------
# allowances: discrete values decided by a float within BAND of a threshold

@torch.no_grad()
def allowances(model, fx: dict, outputs: dict) -> dict[str, Allowance]:
    """The allowance table, measured per case: pasted mask pixels whose probability is within BAND of the 0.5
    threshold (minseg's probabilities: pasted at 0.5 - BAND and at 0.5 + BAND, the pixels that differ), sem-seg
    pixels whose top-2 logits are within BAND x the logits' scale (minseg's logits), instance scores within BAND of
    the fusion's 0.5 confidence threshold (the recording's). Those values may differ from the recording; every
    other value must be identical. A flipped mask or sem-seg pixel changes one panoptic pixel and one segment's
    area. Near-equal scores that swap are re-matched (follow_recorded_order), not allowed for; not measured: mask
    overlaps within BAND of the fusion's overlap_thresh."""
    table = {}
    for case in ("model", "predictor"):
        out, cap = outputs[case]
        (raw,) = cap["raw"]
        image = cap["image"]
        size = tuple(image.shape[-2:])
        height, width = out["panoptic_seg"].shape
        low, high = (detector_postprocess(raw, size, height, width, 0.5 + sign * BAND)["masks"] for sign in (-1, 1))
        near_half = int((low != high).sum())
        top2 = out["sem_seg"].topk(2, dim=0).values
        near_argmax = int((top2[0] - top2[1] < BAND * out["sem_seg"].abs().max()).sum())
        scores = fx[f"{case}.instances.scores"]
        ties = int((scores[:-1] - scores[1:] < BAND).sum())
        near_conf = int(((scores - model.cfg.fusion.instances_score_thresh).abs() < BAND).sum())
        table[f"{case}.instances.pred_masks"] = Allowance(near_half, f"mask probabilities within {BAND:g} of 0.5")
        if f"{case}.sem_seg_argmax" in fx:
            table[f"{case}.sem_seg_argmax"] = Allowance(near_argmax, f"pixels whose top-2 logits are within {BAND:g} rel")
        table[f"{case}.panoptic_seg"] = Allowance(near_half + near_argmax, "the pixels of both rows above")
        table[f"{case}.segments.area"] = Allowance(near_half + near_argmax, "segments holding such a pixel")
        for key in ("raw.pred_classes", "instances.pred_classes", "segments.id", "segments.category_id",
                    "segments.isthing", "segments.instance_id"):
            table[f"{case}.{key}"] = Allowance(near_conf, f"{near_conf} instance scores within {BAND:g} of the 0.5 fusion "
                                               f"threshold; {ties} adjacent within {BAND:g} (rows, segments re-matched)")
    return table



def check() -> ParityRow:
    torch.set_num_threads(2)
    return fixture_verdict(MODEL, ORIGINAL, build_model(), load_fixture()[0], run_report, canary, allowances,
                           TOLERANCE)


CHECKS = {MODEL: (ORIGINAL, check)}

if __name__ == "__main__":  # every stage, the canary and the allowance table: a closer look than the table's row
    torch.set_num_threads(2)
    print_fixture_report(build_model(), load_fixture()[0], run_report, canary, allowances)
