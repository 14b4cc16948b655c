"""Shared pieces of the parity harness: result rows, tensor comparison, fixture location."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
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


def compare(ours: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float, float]:
    """(bitwise equal, max abs diff, max rel diff); discrete tensors must be equal, shapes always."""
    if ours.shape != expected.shape:
        return False, float("inf"), float("inf")
    ours = ours.detach().cpu()
    equal = torch.equal(ours.to(expected.dtype), expected)
    if not expected.is_floating_point():
        return equal, 0.0 if equal else float("inf"), 0.0 if equal else float("inf")
    d, r = diff(ours, expected)
    return equal, d, r


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


RECORDED_KERNELS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # the fixtures' machine's kernels


def recorded_kernels_available() -> bool:
    """True on x86-64 Linux with AVX2, where oneDNN and ATen can be told to use the AVX2 kernels the fixtures'
    machine used (conv accumulation order depends on the ISA: AVX-512 kernels round differently)."""
    if platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file():
        return False
    return " avx2" in Path("/proc/cpuinfo").read_text()


def run_with_recorded_kernels(module: str, timeout: float) -> list[tuple[str, bool, float, float]]:
    """`python -m module` (which prints its run_report() rows as JSON on its last line) in a fresh process
    restricted to the recording's kernels: they must be chosen before torch starts."""
    env = {**os.environ, **RECORDED_KERNELS}
    done = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"parity subprocess failed: {done.stderr.strip()[-500:]}")
    return [tuple(row) for row in json.loads(done.stdout.strip().splitlines()[-1])]
