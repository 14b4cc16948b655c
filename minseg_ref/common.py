"""Shared pieces of the parity harness: result rows, tensor comparison, fixture location."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ParityRow:
    model: str
    original: str
    max_abs: float          # max |minseg - original| over every compared float tensor
    max_rel: float          # max_abs relative to the compared tensor's max |original|
    passed: bool
    detail: str = ""
    checks: str = "numbers"  # or "structure only": no outputs of the original to compare with (detail says why)


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that difference relative to max |b|) of two same-shape tensors, in float64."""
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    d = (a - b).abs().max().item()
    return d, d / max(b.abs().max().item(), 1e-12)


class Tally:
    """Accumulates the worst abs / rel difference over several tensor comparisons."""

    def __init__(self):
        self.max_abs = 0.0
        self.max_rel = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        d, r = diff(a, b)
        self.max_abs, self.max_rel = max(self.max_abs, d), max(self.max_rel, r)
        return d, r


def parity_dir() -> Path:
    """Folder of the recorded YOLACT / detectron2 fixtures: $MINSEG_PARITY_DIR, else ../shared/parity beside the repo."""
    return Path(os.environ.get("MINSEG_PARITY_DIR", REPO.parent / "shared" / "parity"))


def fixture_dir(name: str) -> Path:
    """The fixture folder `name`; FileNotFoundError that says where it was looked for when absent."""
    path = parity_dir() / name
    if not (path / "fixture.safetensors").is_file():
        raise FileNotFoundError(f"parity fixture {name!r} not found at {path} (set MINSEG_PARITY_DIR to the shared/parity folder)")
    return path


def load_synth():
    """The shared synthetic-weight recipe (parity/synth.py), imported from the fixture folder, never copied."""
    path = parity_dir() / "synth.py"
    if not path.is_file():
        raise FileNotFoundError(f"synth.py not found at {path} (set MINSEG_PARITY_DIR)")
    spec = importlib.util.spec_from_file_location("minseg_synth", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# verdicts that hold on any CPU
#
# A recorded fixture was computed with one machine's kernels: conv/GEMM blocking, vectorised exp/sigmoid and reduction
# order depend on the CPU (ISA, cache sizes, MKL's own dispatch), and no environment variable reproduces another
# machine's choice. So a stage passes when its float values are within a tolerance relative to their scale and its
# discrete values (classes, indices, integer boxes, thresholded masks, ids) are identical, except for a measured
# number of values decided by a float within rounding of a threshold (an Allowance). Bitwise equality is reported
# as information; it is required only where a canary (one recorded step of the fixture re-run from its recorded
# input) shows that this machine reproduces the recording's kernels.


@dataclass
class Stage:
    """One recorded stage compared with minseg's: bitwise equal?, float differences (float stages) or the number of
    values that differ (discrete stages)."""
    name: str
    bitwise: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    differing: int = 0
    discrete: bool = False


def compare_stage(name: str, ours: torch.Tensor, expected: torch.Tensor) -> Stage:
    discrete = not expected.is_floating_point()
    if ours.shape != expected.shape:
        return Stage(name, False, float("inf"), float("inf"), max(expected.numel(), 1), discrete)
    ours = ours.detach().cpu().to(expected.dtype)
    bitwise = torch.equal(ours, expected)
    if discrete:
        return Stage(name, bitwise, differing=int((ours != expected).sum()), discrete=True)
    return Stage(name, bitwise, *diff(ours, expected))


@dataclass(frozen=True)
class Allowance:
    """At most `limit` values of a discrete stage may differ from the recording: the values decided by a float that
    lies within rounding of a threshold (`reason` says which threshold, which band, and what was measured)."""
    limit: int
    reason: str


def failures(stages: list[Stage], tolerance: float, allowances: dict[str, Allowance]) -> list[str]:
    """The stages that fail, each with why. Float stages: max rel diff <= tolerance (no stage of either fixture
    needs more). Discrete stages: at most allowances[name].limit values differ (0 without an allowance)."""
    out = []
    for s in stages:
        if s.bitwise:
            continue
        if s.discrete:
            limit = allowances[s.name].limit if s.name in allowances else 0
            if s.differing > limit:
                out.append(f"{s.name} ({s.differing} values differ, {limit} allowed)")
        elif not s.max_rel <= tolerance:
            out.append(f"{s.name} (max rel {s.max_rel:.2g})")
    return out


def verdict_row(model: str, original: str, stages: list[Stage], failed: list[str], canary: tuple[bool, str],
                tolerance: float, allowances: dict[str, Allowance]) -> ParityRow:
    """One table row: bitwise count here, the canary's finding, the allowances used, and what failed."""
    tally = Tally()
    for s in stages:
        if not s.discrete:
            tally.max_abs, tally.max_rel = max(tally.max_abs, s.max_abs), max(tally.max_rel, s.max_rel)
    same_kernels, why = canary
    used = sum(s.differing for s in stages if s.discrete)
    detail = (f"{sum(s.bitwise for s in stages)}/{len(stages)} stages bitwise here; "
              + ("recording's kernels reproduced (canary bitwise), so bitwise is required" if same_kernels else
                 f"other kernels than the recording's ({why}): floats within {tolerance:.0e} rel")
              + f"; discrete values differing {used} (allowed {sum(a.limit for a in allowances.values())})")
    if failed:
        detail += f"; FAIL: {', '.join(failed)}"
    return ParityRow(model, original, tally.max_abs, tally.max_rel, not failed, detail)


def fixture_verdict(name: str, original: str, model, fx, run_report, canary, allowances,
                    tolerance: float) -> ParityRow:
    """The row of a recorded fixture: run every stage, ask the canary whether this machine reproduces the
    recording's kernels (then every stage must be bitwise), and judge the rest by `failures`."""
    outputs = {}
    stages = run_report(model, fx, outputs)
    same_kernels, why = canary(model, fx)
    table = allowances(model, fx, outputs)
    failed = failures(stages, tolerance, table)
    if same_kernels:
        failed += [f"{s.name} (not bitwise with the recording's kernels)" for s in stages if not s.bitwise]
    return verdict_row(name, original, stages, failed, (same_kernels, why), tolerance, table)


def allowance_table(table: dict[str, Allowance]) -> str:
    width = max((len(stage) for stage in table), default=0)
    return "\n".join(f"{stage:<{width}} {a.limit:>5}  {a.reason}" for stage, a in table.items())


def print_fixture_report(model, fx, run_report, canary, allowances) -> None:
    """Every stage, the canary and the allowance table: a closer look than the table's row."""
    outputs = {}
    stages = run_report(model, fx, outputs)
    width = max(len(s.name) for s in stages)
    for s in stages:
        print(f"{s.name:<{width}} {'bitwise' if s.bitwise else '':<8} abs {s.max_abs:.3g} rel {s.max_rel:.3g} "
              f"differing {s.differing}")
    print(canary(model, fx))
    print(allowance_table(allowances(model, fx, outputs)))


def match_near_ties(ours: torch.Tensor, our_scores: torch.Tensor, recorded: torch.Tensor, band: float) -> torch.Tensor:
    """An order for our rows (Tensor[K, ...], scores descending) that follows the recording's where the two differ
    only by adjacent swaps of scores closer than `band` (rounding can order near-equal scores either way). A swap is
    taken only when it brings both rows closer to the recorded ones; any other difference is left for the
    comparison to report. -> Tensor[K] indices into our rows."""
    order = torch.arange(len(ours))
    if ours.shape != recorded.shape:
        return order
    for i in range(len(ours) - 1):
        a, b = order[i].item(), order[i + 1].item()
        if (our_scores[a] - our_scores[b]).abs() < band and \
                (ours[b] - recorded[i]).abs().max() < (ours[a] - recorded[i]).abs().max() and \
                (ours[a] - recorded[i + 1]).abs().max() < (ours[b] - recorded[i + 1]).abs().max():
            order[i], order[i + 1] = b, a
    return order
