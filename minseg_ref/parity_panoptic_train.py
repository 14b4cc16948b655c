"""Train-mode parity of panoptic_fpn_resnet50 against one training step recorded by running detectron2
(shared/parity/panoptic_fpn_R_50_train; its README describes every tensor).

The synthetic weights are rebuilt from keys.tsv with the shared recipe (synth.py, the overrides in meta.json), written
as a model-zoo .pkl and converted as a user would; the recorded batch (two images already resized, their instances
and sem_seg targets) goes through `model(batch)` in train mode after torch.manual_seed(1234), and the six losses are
summed in detectron2's dict order and backpropagated, as the recording did.

Compared (run_step + compare):
  losses                       relative difference (README: 1e-5 or better; 1 vs 2 threads moved them by 7e-8)
  sampled anchors, proposals   the matcher's labels and matched gt per anchor / candidate, the sampled anchor labels
                               and sampled proposal indices: identical (no recorded IoU is near a threshold)
  proposals                    boxes and logits per image, same order (max difference relative to their scale)
  head inputs / outputs        RPN logits and deltas, box-predictor logits and deltas, mask logits and targets,
                               sem-seg logits, FPN feature norms and sums
  gradients                    each parameter's norm (relative) and seeded projection (|difference| / norm; the
                               README: 1 vs 2 threads moved them by up to 2.2e-4 of the norm), full gradients of
                               the small heads (relative to their largest value)
  frozen state                 requires_grad as recorded (stem and res2 frozen), FrozenBN buffers unchanged
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import minseg
import minseg.heads.roi_heads as roi_heads_module
from minseg.convert.detectron2 import rename_detectron2
from minseg_ref.common import ParityRow, fixture_dir
from minseg_ref.parity_panoptic import convert_synthetic, read_keys, synthetic_state

FIXTURE = "panoptic_fpn_R_50_train"
MODEL = "panoptic_fpn_resnet50"
ORIGINAL = "detectron2 training-step fixture"
SEED = 1234
LOSS_TOLERANCE = 1e-5   # relative, per loss
PROJ_TOLERANCE = 1e-3   # |projection difference| / gradient norm
NORM_TOLERANCE = 1e-3   # relative, per gradient norm
FULL_TOLERANCE = 1e-5   # full head gradients: max |difference| / max |value| (float32 rounding)
FLOAT_TOLERANCE = 1e-5  # forward tensors: max |difference| / max |value|


def load_fixture() -> tuple[dict[str, torch.Tensor], dict]:
    """(recorded tensors, meta.json); FileNotFoundError naming the place looked in when absent."""
    import json

    from safetensors.torch import load_file

    folder = fixture_dir(FIXTURE)
    return load_file(str(folder / "fixture.safetensors")), json.loads((folder / "meta.json").read_text())


def build_model(meta: dict, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """panoptic_fpn_resnet50 in train mode with the recording's synthetic weights (or `state`, detectron2-named)."""
    if state is None:
        state = synthetic_state(read_keys(fixture_dir(FIXTURE)), meta["weights"])
    model = minseg.create_model(MODEL)
    model.load_state_dict(convert_synthetic(state), strict=True)
    return model.train()


def detectron2_names(keys: list[str]) -> dict[str, str]:
    """minseg parameter name -> detectron2 state_dict key, through the converter's own rename rules."""
    renamed = rename_detectron2({k: torch.tensor(i) for i, k in enumerate(keys)}, "keys")
    return {name: keys[int(index)] for name, index in renamed.items()}


def make_batch(fx: dict[str, torch.Tensor]) -> list[dict]:
    """The recorded inputs as minseg's training batch (the contract's instances dicts; masks as bool)."""
    batch = []
    for i in range(2):
        p = f"train.input{i}."
        image = fx[p + "image"]
        batch.append({"image": image, "height": image.shape[1], "width": image.shape[2],
                      "instances": {"boxes": fx[p + "gt_boxes"], "labels": fx[p + "gt_classes"],
                                    "masks": fx[p + "gt_masks"].bool()},
                      "sem_seg": fx[p + "sem_seg"]})
    return batch


class Recorded:
    """A part (matcher, sampler, function) that also appends each result to `log`; its attributes show through."""

    def __init__(self, part, log: list):
        self.part, self.log = part, log

    def __call__(self, *args, **kwargs):
        out = self.part(*args, **kwargs)
        self.log.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self.part, name)


@contextmanager
def recording(model):
    """Capture the step's intermediates by wrapping the parts (matchers, samplers, the RPN's outputs, the mask
    target function) and hooking modules; everything is restored after."""
    cap: dict[str, list] = {k: [] for k in ("rpn_match", "rpn_sample", "roi_match", "roi_sample", "mask_targets")}
    rpn, heads = model.rpn, model.roi_heads
    saved = (rpn.matcher, rpn.sampler, heads.matcher, heads.sampler, rpn.forward_train, rpn.losses,
             roi_heads_module.project_masks)

    def rpn_losses(logits, deltas, anchors, gt_boxes):
        cap.update(rpn_logits=torch.cat(logits, 1).detach(), rpn_deltas=torch.cat(deltas, 1).detach(), anchors=anchors)
        return saved[5](logits, deltas, anchors, gt_boxes)

    def rpn_forward_train(*args, **kwargs):
        proposals, losses = saved[4](*args, **kwargs)
        cap["proposals"] = proposals
        return proposals, losses

    rpn.matcher, rpn.sampler = Recorded(saved[0], cap["rpn_match"]), Recorded(saved[1], cap["rpn_sample"])
    heads.matcher, heads.sampler = Recorded(saved[2], cap["roi_match"]), Recorded(saved[3], cap["roi_sample"])
    rpn.forward_train, rpn.losses = rpn_forward_train, rpn_losses
    roi_heads_module.project_masks = Recorded(saved[6], cap["mask_targets"])
    hooks = [model.fpn.register_forward_hook(lambda m, i, o: cap.update(features={k: v.detach() for k, v in o.items()})),
             heads.box_predictor.register_forward_hook(lambda m, i, o: cap.update(box=[t.detach() for t in o])),
             heads.mask_head.register_forward_hook(lambda m, i, o: cap.update(mask_logits=o.detach())),
             model.sem_seg_head.predictor.register_forward_hook(lambda m, i, o: cap.update(sem_seg=o.detach()))]
    try:
        yield cap
    finally:
        for h in hooks:
            h.remove()
        rpn.matcher, rpn.sampler, heads.matcher, heads.sampler = saved[:4]
        del rpn.forward_train, rpn.losses  # the instance attributes: the class's methods show through again
        roi_heads_module.project_masks = saved[6]


@dataclass
class Step:
    losses: dict[str, torch.Tensor]
    total: torch.Tensor
    grads: dict[str, torch.Tensor]            # by detectron2 key
    frozen: list[str]                         # detectron2 keys with requires_grad False
    buffers_unchanged: bool
    cap: dict = field(default_factory=dict)


def run_step(model, fx: dict[str, torch.Tensor]) -> Step:
    """One recorded training step: seed, forward, sum in dict order, backward."""
    names = detectron2_names([k for k, _, _ in read_keys(fixture_dir(FIXTURE))])
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    with recording(model) as cap:
        torch.manual_seed(SEED)
        losses = model(make_batch(fx))
        total = sum(losses.values())  # ((0 + l0) + l1) + ..., detectron2's sum over the dict
        total.backward()
    grads = {names[n]: p.grad for n, p in model.named_parameters() if p.grad is not None}
    frozen = [names[n] for n, p in model.named_parameters() if not p.requires_grad]
    unchanged = all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    return Step({k: v.detach() for k, v in losses.items()}, total.detach(), grads, frozen, unchanged, cap)


def projection(key: str, grad: torch.Tensor) -> float:
    """The recording's seeded projection: sum(grad * r), r ~ N(0, 1) float64 from a generator seeded by the key."""
    g = torch.Generator().manual_seed((zlib.crc32(key.encode()) + 777) % 2**32)
    return float((grad.double() * torch.randn(grad.shape, dtype=torch.float64, generator=g)).sum())


def rel(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """max |difference| / max |expected| (0 when both are all zero)."""
    a, b = ours.double(), expected.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale else diff


def anchor_labels(samples: list, num_anchors: int) -> list[torch.Tensor]:
    """Per image the sampled anchor labels as detectron2's label_and_sample_anchors leaves them: 1, 0, -1."""
    out = []
    for pos, neg in samples:
        label = torch.full((num_anchors,), -1, dtype=torch.int8)
        label[pos], label[neg] = 1, 0
        out.append(label)
    return out


def compare(step: Step, fx: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every comparison -> a number: relative differences for floats, counts of differing elements for discrete
    tensors (0 = identical). check() says which pass."""
    cap, r = step.cap, {}
    for name, value in step.losses.items():
        r[f"loss {name}"] = abs(value.item() - fx[f"train.loss.{name}"].item()) / abs(fx[f"train.loss.{name}"].item())
    r["loss total"] = abs(step.total.item() - fx["train.loss.total"].item()) / fx["train.loss.total"].item()
    # anchors, matching and sampling
    r["rpn anchors"] = rel(cap["anchors"], fx["train.rpn.anchors"])
    r["rpn objectness_logits"] = rel(cap["rpn_logits"], fx["train.rpn.objectness_logits"])
    r["rpn anchor_deltas"] = rel(cap["rpn_deltas"], fx["train.rpn.anchor_deltas"])
    A = cap["anchors"].shape[0]
    (rpn_samples,) = cap["rpn_sample"]  # one call for the batch: per image (positives, negatives)
    for i, ((matches, labels), sampled) in enumerate(zip(cap["rpn_match"], anchor_labels(rpn_samples, A))):
        p = f"train.rpn.img{i}."
        r[f"rpn img{i} match_labels (differing)"] = int((labels != fx[p + "match_labels"]).sum())
        fg = fx[p + "match_labels"] == 1
        r[f"rpn img{i} matched_idxs (differing fg)"] = int((matches[fg] != fx[p + "matched_idxs"][fg]).sum())
        r[f"rpn img{i} anchor_labels (differing)"] = int((sampled != fx[p + "anchor_labels"]).sum())
    for i, proposals in enumerate(cap["proposals"]):
        p = f"train.proposals.img{i}."
        same = proposals["boxes"].shape == fx[p + "boxes"].shape
        r[f"proposals img{i} boxes"] = rel(proposals["boxes"], fx[p + "boxes"]) if same else float("inf")
        r[f"proposals img{i} logits"] = rel(proposals["scores"], fx[p + "objectness_logits"]) if same else float("inf")
    for i, ((matches, labels), [(pos, neg)]) in enumerate(zip(cap["roi_match"], cap["roi_sample"])):
        p = f"train.roi.img{i}."
        same = labels.shape == fx[p + "match_labels"].shape
        r[f"roi img{i} match_labels (differing)"] = int((labels != fx[p + "match_labels"]).sum()) if same else -1
        sampled = torch.cat((pos, neg))
        same = sampled.shape == fx[p + "sampled_idxs"].shape
        r[f"roi img{i} sampled_idxs (differing)"] = int((sampled != fx[p + "sampled_idxs"]).sum()) if same else -1
        if same:
            r[f"roi img{i} matched_gt_idx (differing)"] = int((matches[sampled] != fx[p + "matched_gt_idx"]).sum())
    # head outputs and targets
    r["roi cls_logits"] = rel(cap["box"][0], fx["train.roi.cls_logits"])
    r["roi bbox_deltas"] = rel(cap["box"][1], fx["train.roi.bbox_deltas"])
    targets = torch.cat(cap["mask_targets"])
    same = targets.shape == fx["train.mask.targets"].shape
    r["mask targets (differing)"] = int((targets != fx["train.mask.targets"].float()).sum()) if same else -1
    logits = cap["mask_logits"]
    if same:
        r["mask logits_gt_class"] = rel(logits[torch.arange(len(logits)), fx["train.mask.gt_classes"]],
                                        fx["train.mask.logits_gt_class"])
    r["sem_seg logits"] = rel(cap["sem_seg"], fx["train.sem_seg.logits"])
    for level, f in cap["features"].items():
        for stat, value in (("norm", f.double().norm()), ("sum", f.double().sum())):
            expected = fx[f"train.features.{level}.{stat}"]
            r[f"features {level} {stat}"] = abs(value.item() - expected.item()) / max(abs(expected.item()), 1e-12)
    # gradients
    recorded = {k[len("train.grad."):-len(".norm")] for k in fx if k.startswith("train.grad.") and k.endswith(".norm")}
    r["grad parameters (missing or extra)"] = len(recorded ^ set(step.grads))
    for key in sorted(recorded & set(step.grads)):
        g, norm = step.grads[key], fx[f"train.grad.{key}.norm"].item()
        r[f"grad {key} norm"] = abs(g.double().norm().item() - norm) / norm
        r[f"grad {key} proj"] = abs(projection(key, g) - fx[f"train.grad.{key}.proj"].item()) / norm
    for key in (k[len("train.grad_full."):] for k in fx if k.startswith("train.grad_full.")):
        r[f"grad_full {key}"] = rel(step.grads[key], fx[f"train.grad_full.{key}"])
    return r


def tolerance(name: str) -> float:
    if name.startswith("loss"):
        return LOSS_TOLERANCE
    if name.endswith(" proj"):
        return PROJ_TOLERANCE
    if name.endswith(" norm") and name.startswith("grad"):
        return NORM_TOLERANCE
    if name.startswith("grad_full"):
        return FULL_TOLERANCE
    if "differing" in name or "missing" in name:
        return 0
    return FLOAT_TOLERANCE


def failures(report: dict[str, float]) -> list[str]:
    return [f"{name}: {value:.3g} > {tolerance(name):g}" for name, value in report.items()
            if not 0 <= value <= tolerance(name)]


def check() -> ParityRow:
    """The `panoptic_fpn_resnet50:train` row of `minseg parity`: worst float difference (relative, as compare()
    measures each), and whether every loss, sample and gradient is within its tolerance."""
    torch.set_num_threads(2)  # the recording's
    fx, meta = load_fixture()
    step = run_step(build_model(meta), fx)
    report = compare(step, fx)
    floats = [v for k, v in report.items() if tolerance(k) > 0]
    loss_abs = max(abs(v.item() - fx[f"train.loss.{k}"].item()) for k, v in step.losses.items())
    bitwise = all(torch.equal(v, fx[f"train.loss.{k}"]) for k, v in step.losses.items())
    bad = failures(report)
    detail = (f"train step: 6 losses ({'bitwise' if bitwise else 'not bitwise'}), sampled anchors/proposals, "
              f"{len(step.grads)} gradients (norm, projection), 12 full head gradients"
              + (f"; {len(bad)} out of tolerance, e.g. {bad[0]}" if bad else ""))
    return ParityRow(f"{MODEL} (train)", ORIGINAL, loss_abs, max(floats), not bad, detail)


CHECKS = {f"{MODEL}:train": (ORIGINAL, check)}


def train_steps(arch: str, device: str) -> dict:
    """{"ours": one training step (forward in train mode, the six losses, backward) on the recorded batch}, for
    `minseg bench --train`; detectron2 cannot run here."""
    fx, meta = load_fixture()
    if arch != MODEL:
        raise ValueError(f"the recorded training step is {MODEL}'s, not {arch}'s")
    model = build_model(meta).to(device)
    batch = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()} for item in make_batch(fx)]

    def step() -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():  # the bench harness calls us under inference_mode
            model.zero_grad(set_to_none=True)
            total = sum(model(batch).values())
            total.backward()
        return total.detach()
    return {"ours": step}


def main() -> int:
    fx, meta = load_fixture()
    model = build_model(meta)
    step = run_step(model, fx)
    report = compare(step, fx)
    for name, value in report.items():
        print(f"{name:70s} {value:10.3g}  {'ok' if 0 <= value <= tolerance(name) else 'FAIL'}")
    recorded_frozen = meta["parameters"]["requires_grad_false"]
    print(f"requires_grad False as recorded: {sorted(step.frozen) == sorted(recorded_frozen)}; "
          f"FrozenBN buffers unchanged: {step.buffers_unchanged}")
    bitwise = [n for n in step.losses if torch.equal(step.losses[n], fx[f"train.loss.{n}"])]
    print(f"losses bitwise equal: {bitwise}")
    bad = failures(report)
    print("PASS" if not bad else "FAIL:\n  " + "\n  ".join(bad))
    return int(bool(bad))


if __name__ == "__main__":
    raise SystemExit(main())
