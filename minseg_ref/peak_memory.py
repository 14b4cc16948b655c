"""CPU peak memory of one inference call, each side measured alone in a fresh process.

The figure is the extra memory a forward pass needs: the most resident memory (RSS) the process reached
during one call, minus its resident memory just before the call. Weights and the input are already there,
so they are not counted; activations, workspaces and the outputs are.

How, in a fresh `python` process per side (minseg, the original), with the parent's thread count and glibc's
mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536):
1. build the pair the way the bench does, keep one side, drop the other;
2. one warm-up forward: one-time state (OpenMP threads and their stacks, oneDNN's primitive cache) belongs to
   the process, not to a forward, so it is excluded;
3. `gc.collect()` and glibc's `malloc_trim(0)`, so that memory freed earlier but kept by malloc is not reused
   by the forward without the resident set moving;
4. reset the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`) and read VmRSS from
   /proc/self/status; run the forward under torch.inference_mode; the peak is VmHWM - VmRSS.
Steps 3 and 4 are repeated for 3 forwards and the median is reported.

Why each piece:
- The reset in step 4 makes the figure the forward's: ru_maxrss (getrusage) never goes down, so it would still
  hold whatever building the pair reached (two models plus a state-dict copy) or the first call's lazy setup.
- One process per side: a high-water mark and malloc's free lists are per process, so in a shared process one
  side's peak could hide the other's, and whichever ran second would reuse the first one's pages.
- The fixed mmap threshold: by default glibc raises it after every large free (up to 32 MiB), so activations
  come from heaps that keep freed pages resident and fragment in an order that depends on thread timing. Then
  the same forward's figure moved by ~50 MB from process to process (U-Net at 512x512: 134 to 206 MB, for
  112 MB of tensors). With every block of 64 KiB or more mapped on allocation and unmapped on free, the resident
  set follows the live memory: repeat runs agree to 0.1 MB and match the peak of live tensor bytes that
  torch.profiler(profile_memory=True) reports, plus whatever non-tensor memory a forward touches. So the figure
  is what a forward needs, not what a default glibc happens to keep cached on top of it.

It needs Linux (/proc) and glibc; elsewhere cpu_peak_mb returns None and the bench prints "-".
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def supported() -> bool:
    """True where the kernel's RSS high-water mark can be read and reset, and glibc's malloc_trim exists."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    return STATUS.is_file() and CLEAR_REFS.exists()


def _status_kb(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {STATUS}")


def forward_peak_mb(forward: Callable[[], object], calls: int = 3) -> float:
    """Median (VmHWM - VmRSS before the call) over `calls` forwards, in MB, in this process. Run one warm-up
    forward first; see the module docstring."""
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    peaks = []
    for _ in range(calls):
        gc.collect()
        trim(0)
        CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
        with torch.inference_mode():
            out = forward()
        peaks.append((_status_kb("VmHWM") - before) / 1024)
        del out
    return statistics.median(peaks)


def cpu_peak_mb(setup: Callable[..., dict], args: list, side: str, timeout: float = 900) -> float | None:
    """Peak MB of `setup(*args, "cpu")[side]()` (setup: a module-level function returning {"ours": forward,
    "original": forward}) measured in a fresh process; None where the method is not supported here."""
    if not supported():
        return None
    spec = json.dumps({"setup": f"{setup.__module__}:{setup.__qualname__}", "args": list(args), "side": side,
                       "threads": torch.get_num_threads()})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-m", "minseg_ref.peak_memory", spec], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(spec: dict) -> float:
    torch.set_num_threads(spec["threads"])
    module, name = spec["setup"].split(":")
    forwards = getattr(importlib.import_module(module), name)(*spec["args"], "cpu")
    forward = forwards.pop(spec["side"])
    del forwards  # the other side's model goes with its forward
    with torch.inference_mode():
        forward()  # warm-up
    return forward_peak_mb(forward)


if __name__ == "__main__":
    print(main(json.loads(sys.argv[1])))
