"""CPU peak memory of one inference call, each side measured alone in a fresh process.

The figure is the extra memory a forward pass needs: the most resident memory (RSS) the process reached
during one call, minus its resident memory just before the call. Weights and the input are already there,
so they are not counted; activations, workspaces and the outputs are.

How, in a fresh `python` process per side (minseg, the original), with the parent's thread count:
1. build the pair the way the bench does, keep one side, drop the other;
2. one warm-up forward: one-time state (OpenMP threads and their stacks, oneDNN's primitive cache) belongs to
   the process, not to a forward, so it is excluded;
3. `gc.collect()` and glibc's `malloc_trim(0)`: memory freed by the warm-up but kept by malloc (glibc raises
   its mmap threshold after large frees, so later activations come from the heap and stay there) is handed
   back to the kernel, otherwise the next forward would reuse it without the RSS moving;
4. reset the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`) and read VmRSS from
   /proc/self/status; run the forward under torch.inference_mode; the peak is VmHWM - VmRSS.
The reset in step 4 is what makes the figure the forward's: ru_maxrss (getrusage) never goes down, so it
would still hold whatever building the pair reached (two models plus a state-dict copy) or the warm-up's
first-call peak. One process per side, because a high-water mark and malloc's free lists are per process:
in a shared process one side's peak could hide the other's, and whichever ran second would reuse pages.
Steps 3 and 4 are repeated for 3 forwards and the median is reported: thread scheduling moves the figure by
up to ~10% from call to call (which OpenMP thread frees what when, in which malloc arena).

It needs Linux (/proc) and glibc; elsewhere cpu_peak_mb returns None and the bench prints "-".
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
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
    done = subprocess.run([sys.executable, "-m", "minseg_ref.peak_memory", spec], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
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
