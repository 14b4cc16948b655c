"""Train-mode parity of yolact_resnet50 against one training step recorded by running dbolya/yolact
(shared/parity/yolact_resnet50_train: forward in train mode, MultiBoxLoss, train.py's reduction, backward).

The synthetic checkpoint is rebuilt from the fixture's keys.tsv with the shared recipe, written as the original
writes weights, converted with minseg.convert("yolact", ...) and trained one step on the recorded batch with
torch.manual_seed(seed) right before the forward. Compared, each as a named check:
  losses        B, M, C, S (criterion output and after .mean()) and the total: relative LOSS_TOL
  outputs       loc, conf (logits), priors, coefficients at the positives, proto and segm summaries: relative LOSS_TOL
  matching      conf_t, idx_t (identical), best IoU before forcing and loc_t at the positives (LOSS_TOL)
  ohem          the sort key at the background priors (LOSS_TOL), the hard negatives (identical)
  masks         the masks_to_train subsample (identical prior and gt indices, the RNG left where the original left
                it), the per-mask losses (LOSS_TOL), the semantic targets (identical)
  grads         per parameter: norm (relative PROJ_TOL) and |proj - recorded| / norm <= PROJ_TOL (the README's seeded
                projection), the set of parameters with a gradient; the full head gradients: relative HEAD_TOL
  bn            every running mean / var (norm, projection; three layers in full) unchanged and equal to the recording
"""
from __future__ import annotations

import json
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import minseg
from minseg.convert.common import rename
from minseg.convert.yolact import DROPS, RULES
from minseg.heads.yolact_loss import hard_negatives, image_mask_loss, match_batch, mining_loss, semantic_target
from minseg_ref.common import ParityRow, diff, fixture_dir, load_synth
from minseg_ref.parity_yolact import synthetic_state, unpack_masks

FIXTURE = "yolact_resnet50_train"
ORIGINAL = "dbolya/yolact training-step fixture"
LOSS_TOL = 1e-5  # relative, the bound for losses and float intermediates (measured here: 0, bitwise)
PROJ_TOL = 1e-3  # |d proj| / ||grad||; the original itself moves by up to 6e-4 with 1 thread instead of 2
HEAD_TOL = 1e-5  # full head gradients, relative to their max: float32 rounding (measured here: 0, bitwise)
HEAD_GRADS = ["prediction_layers.0.conf_layer", "prediction_layers.0.bbox_layer", "prediction_layers.0.mask_layer",
              "semantic_seg_conv", "proto_net.10"]


@dataclass
class Check:
    name: str
    error: float        # the measured difference (relative, or a count of differing elements)
    limit: float
    exact: bool = False  # an exact check: error counts differing elements and must be 0

    @property
    def passed(self) -> bool:
        return self.error <= self.limit


def load_fixture() -> tuple[dict[str, torch.Tensor], dict, Path]:
    from safetensors.torch import load_file

    folder = fixture_dir(FIXTURE)
    return load_file(str(folder / "fixture.safetensors")), json.loads((folder / "meta.json").read_text()), folder


def minseg_names(keys) -> dict[str, str]:
    """{minseg parameter name: the original's state_dict key}, through the converter's own rename rules."""
    return rename({k: k for k in keys}, RULES, DROPS, "key map")


def build_train_model(fx_meta_folder, perturb: dict[str, float] | None = None):
    """minseg yolact_resnet50 in train mode with the fixture's synthetic weights; `perturb` scales named parameters
    (minseg names) to show the checks notice a change."""
    _, meta, folder = fx_meta_folder
    state = synthetic_state(folder, meta)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synth.pth"
        load_synth().write_checkpoint(state, meta["checkpoint_format"], path)
        converted = minseg.convert("yolact", path, arch="yolact_resnet50")
    for name, factor in (perturb or {}).items():
        converted[name] = converted[name] * factor
    model = minseg.create_model("yolact_resnet50")
    model.load_state_dict(converted, strict=True)
    return model.train(), state


def targets_of(fx: dict[str, torch.Tensor]) -> list[dict]:
    """The recorded batch's targets in minseg's format (boxes_rel, labels with -1 crowds, float masks, num_crowds)."""
    targets, size = [], fx["train.x"].shape[-1]
    for i, num_crowds in enumerate(fx["train.num_crowds"].tolist()):
        t = fx[f"train.targets.{i}"]
        masks = unpack_masks(fx[f"train.masks_packbits.{i}"], size).float()
        targets.append({"boxes": t[:, :4], "labels": t[:, 4].long(), "masks": masks, "num_crowds": num_crowds})
    return targets


@dataclass
class Step:
    out: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]
    total: torch.Tensor
    rng_after: torch.Tensor


def run_step(model, fx: dict[str, torch.Tensor], seed: int) -> Step:
    """train.py's iteration without the optimizer step: seed, forward, loss, sum in dict order, backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(fx["train.x"])
    losses = model.loss(out, targets_of(fx))
    total = sum(losses.values())
    total.backward()
    return Step(out, losses, total, torch.get_rng_state())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return diff(a.double(), b.double())[1]


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum()) if a.shape == b.shape else max(a.numel(), b.numel())


def projection(key: str, g: torch.Tensor) -> torch.Tensor:
    """The README's seeded projection of a gradient (or buffer) under its original key."""
    gen = torch.Generator().manual_seed((zlib.crc32(key.encode()) + 777) % 2**32)
    return (g.double() * torch.randn(g.shape, dtype=torch.float64, generator=gen)).sum()


@torch.no_grad()
def compare(model, step: Step, fx: dict[str, torch.Tensor], meta: dict, synth: dict) -> list[Check]:
    checks: list[Check] = []
    add = lambda name, error, limit=LOSS_TOL: checks.append(Check(name, error, limit))
    exact = lambda name, count: checks.append(Check(name, count, 0, exact=True))
    out, cfg = step.out, model.cfg.loss
    # losses: MultiBoxLoss's outputs, train.py's .mean() (a no-op on one device) and their sum
    for ours, theirs in (("box", "B"), ("mask", "M"), ("class", "C"), ("semantic", "S")):
        add(f"loss.{theirs}", rel(step.losses[ours], fx[f"train.loss.{theirs}"]))
        add(f"loss.{theirs}.mean", rel(step.losses[ours].mean(), fx[f"train.loss.{theirs}.mean"]))
    add("loss.total", rel(step.total, fx["train.loss.total"]))
    # network outputs
    for key in ("loc", "conf", "priors"):
        add(f"out.{key}", rel(out[key], fx[f"train.out.{key}"]))
    for key in ("proto", "segm"):
        x = out[key] if key == "proto" else out[key].permute(0, 2, 3, 1)  # channels last
        add(f"out.{key}.mean_per_channel", rel(x.mean((1, 2)), fx[f"train.out.{key}.mean_per_channel"]))
        add(f"out.{key}.absmax_per_channel", rel(x.abs().amax((1, 2)), fx[f"train.out.{key}.absmax_per_channel"]))
        first = out[key][..., :4] if key == "proto" else out[key][:, :4]
        add(f"out.{key}.first4ch", rel(first, fx[f"train.out.{key}.first4ch"]))
    # matching
    targets = targets_of(fx)
    t = match_batch(out["priors"], targets, cfg)
    pos = t.labels > 0
    exact("match.conf_t", differing(t.labels, fx["train.match.conf_t"]))
    exact("match.idx_t", differing(t.gt_index, fx["train.match.idx_t"]))
    exact("match.num_pos", differing(pos.sum(1), fx["train.loss.num_pos"]))
    add("match.loc_t_pos", rel(t.loc_t[pos], fx["train.match.loc_t_pos"]))
    add("out.mask_at_pos", rel(out["mask"][pos], fx["train.out.mask_at_pos"]))
    # OHEM: the sort key where it decides (background priors) and the negatives it picks
    mining, background = mining_loss(out["conf"]), t.labels == 0
    add("ohem.mining_loss", rel(mining[background], fx["train.ohem.mining_loss"][background]))
    neg = hard_negatives(mining, t.labels, cfg.negpos_ratio)
    exact("ohem.neg", differing(neg, fx["train.ohem.neg"].bool()))
    # the masks_to_train subsample: the prior and gt indices, and the RNG where the original left it
    torch.manual_seed(meta["seed"])
    for b, (_, labels, masks) in enumerate(t.objects):
        per_mask, used = image_mask_loss(out["proto"][b], out["mask"][b], pos[b].nonzero()[:, 0], t.gt_index[b],
                                         t.gt_box[b], masks, cfg.masks_to_train)
        exact(f"mask.prior_idx.{b}", differing(used, fx[f"train.maskloss.prior_idx.{b}"]))
        exact(f"mask.gt_idx.{b}", differing(t.gt_index[b, used], fx[f"train.maskloss.gt_idx.{b}"]))
        add(f"mask.gt_box.{b}", rel(t.gt_box[b, used], fx[f"train.maskloss.gt_box.{b}"]))
        add(f"mask.pre_loss.{b}", rel(per_mask, fx[f"train.maskloss.pre_loss.{b}"]))
        segm_t = semantic_target(masks, labels, out["segm"].shape[1], tuple(out["segm"].shape[-2:]))
        recorded = unpack_masks(fx[f"train.segm_t_packbits.{b}"], segm_t.shape[-1])
        exact(f"semantic.target.{b}", differing(segm_t.bool(), recorded))
    exact("mask.rng_state_after", differing(step.rng_after, torch.get_rng_state()))
    # gradients under the original's names
    names = minseg_names(synth)
    params = dict(model.named_parameters())
    without = sorted(names[n] for n, p in params.items() if not p.requires_grad)
    exact("grad.params_without_grad", len(set(without) ^ set(meta["params_without_grad"])))
    for ours, key in names.items():
        if f"train.grad.{key}.norm" not in fx:
            continue
        g = params[ours].grad
        norm = fx[f"train.grad.{key}.norm"]
        add(f"grad.{key}.norm", rel(g.double().norm(), norm), PROJ_TOL)
        add(f"grad.{key}.proj", float((projection(key, g) - fx[f"train.grad.{key}.proj"]).abs() / norm), PROJ_TOL)
        if any(key.startswith(h + ".") for h in HEAD_GRADS):
            add(f"grad.{key}", rel(g, fx[f"train.grad.{key}"]), HEAD_TOL)
    # BatchNorm: frozen, so every running statistic is the checkpoint's, as recorded
    buffers = dict(model.named_buffers())
    for ours, key in names.items():
        if f"train.bn.{key}.norm" in fx:
            exact(f"bn.{key}", int(buffers[ours].double().norm() != fx[f"train.bn.{key}.norm"])
                  + int(projection(key, buffers[ours]) != fx[f"train.bn.{key}.proj"]))
        if f"train.bn.{key}" in fx:
            exact(f"bn.{key}.full", differing(buffers[ours], fx[f"train.bn.{key}"]))
    return checks


def run(perturb: dict[str, float] | None = None) -> list[Check]:
    """Every check of one recorded training step."""
    fixture = load_fixture()
    fx, meta, _ = fixture
    model, synth = build_train_model(fixture, perturb)
    return compare(model, run_step(model, fx, meta["seed"]), fx, meta, synth)


def check() -> ParityRow:
    checks = run()
    same = all(c.error == 0 for c in checks)
    failed = [c.name for c in checks if not c.passed]
    floats = [c for c in checks if not c.exact]
    worst = max(floats, key=lambda c: c.error / c.limit)
    detail = (f"train step: {len(checks)} checks (4 losses, 89 gradients, matching, OHEM, mask subsample, BN), "
              + ("all bitwise equal" if same else f"worst {worst.name} {worst.error:.1e}")
              + (f"; FAIL: {', '.join(failed[:5])}" if failed else ""))
    worst_rel = max(c.error for c in floats if c.limit == LOSS_TOL)
    return ParityRow("yolact_resnet50 (train)", ORIGINAL, float("nan"), worst_rel, not failed, detail)


CHECKS = {"yolact_resnet50:train": (ORIGINAL, check)}


def train_steps(device: str) -> dict:
    """{"ours": one training step (forward, the four losses, backward, SGD with momentum and weight decay) on the
    recorded batch with the fixture's weights}, for `minseg bench --train`; the original cannot run here."""
    fixture = load_fixture()
    fx, meta, _ = fixture
    model = build_train_model(fixture)[0].to(device)
    x = fx["train.x"].to(device)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets_of(fx)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step() -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():  # the bench harness calls us under inference_mode
            torch.manual_seed(meta["seed"])
            loss = sum(model.loss(model(x), targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.detach()
    return {"ours": step}

if __name__ == "__main__":  # every check, one line each
    torch.set_num_threads(2)
    checks = run()
    for c in checks:
        bound = f"limit {c.limit:g}" + (", exact" if c.exact else "")
        print(f"{'ok  ' if c.passed else 'FAIL'} {c.name:60s} {c.error:10.3g} ({bound})")
    print(f"{sum(c.passed for c in checks)}/{len(checks)} checks pass, "
          f"{sum(c.error == 0 for c in checks)} of them bitwise equal to the recording")
