"""`minseg bench`: minseg against its original on the same weights and input, alternating in one process.

Reports medians of `repeats` timed runs per side (after one warm-up each), the ratio minseg/original,
and the peak memory of each side: the extra memory one forward needs beyond the model and its input.
On CUDA that is torch.cuda.max_memory_allocated() minus memory_allocated() before the call, reset before
every call, in the timing process. On CPU it is the resident-set high-water mark of one forward, each side
alone in a fresh process (minseg_ref/peak_memory.py says how and why). For YOLACT and Panoptic FPN, whose
originals cannot be installed here, minseg's absolute figures are reported with the published time for context.

Each family gives a setup function `(*args, device) -> {"ours": forward, "original": forward}` (zero-argument
calls on a built model and a fixed input); `compare_sides` times the two alternately and measures their peaks.
"""
from __future__ import annotations

import importlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

SEMANTIC = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"]


@dataclass
class BenchRow:
    model: str
    device: str
    input: str
    ours_ms: float
    original_ms: float | None      # None where the original cannot run here
    ours_peak_mb: float | None = None
    original_peak_mb: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.original_ms is None else self.ours_ms / self.original_ms


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, float | None]:
    """(milliseconds, on CUDA the peak MB allocated during the call beyond what was allocated before it)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    sync(device)
    ms = (time.perf_counter() - start) * 1000
    return ms, ((torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else None)


def alternate(ours, original, device: str, repeats: int) -> tuple[float, float, float | None, float | None]:
    """ABAB-interleaved medians: (ours ms, original ms, ours peak MB, original peak MB)."""
    timed(ours, device), timed(original, device)  # warm-up
    a, b, pa, pb = [], [], [], []
    for _ in range(repeats):
        t, p = timed(ours, device); a.append(t); pa.append(p)
        t, p = timed(original, device); b.append(t); pb.append(p)
    peak = (lambda ps: max(ps) if ps[0] is not None else None)
    return statistics.median(a), statistics.median(b), peak(pa), peak(pb)


def compare_sides(setup: Callable[..., dict], args: list, device: str, repeats: int,
                  forwards: dict | None = None) -> tuple[float, float, float | None, float | None]:
    """(ours ms, original ms, ours peak MB, original peak MB) of setup(*args, device)'s two forwards (pass them
    as `forwards` if already built): times from `alternate`; peaks from it on CUDA, on CPU from a fresh process
    per side, after the timing. `setup` must be a module-level function, args JSON values."""
    forwards = forwards or setup(*args, device)
    t_ours, t_ref, p_ours, p_ref = alternate(forwards["ours"], forwards["original"], device, repeats)
    del forwards
    if device == "cpu":
        from minseg_ref.peak_memory import cpu_peak_mb

        p_ours, p_ref = cpu_peak_mb(setup, args, "ours"), cpu_peak_mb(setup, args, "original")
    return t_ours, t_ref, p_ours, p_ref


def ours_only(setup: Callable[..., dict], args: list, device: str, repeats: int) -> tuple[float, float | None]:
    """(median ms, peak MB) of setup(*args, device)["ours"] alone, for models whose original cannot run here."""
    forward = setup(*args, device)["ours"]
    timed(forward, device)  # warm-up
    times, peaks = zip(*(timed(forward, device) for _ in range(repeats)))
    del forward
    if device == "cpu":
        from minseg_ref.peak_memory import cpu_peak_mb

        return statistics.median(times), cpu_peak_mb(setup, args, "ours")
    return statistics.median(times), max(peaks)


def semantic_forwards(name: str, device: str) -> dict:
    """FCN / DeepLabV3: torchvision's seeded init and minseg converted from it, on one 520x520 image."""
    from minseg_ref.parity_semantic import build_pair

    ref, ours = build_pair(name, seed=0)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.randn(1, 3, 520, 520, generator=torch.Generator().manual_seed(0)).to(device)
    return {"ours": lambda: ours(x), "original": lambda: ref(x)}


def bench_semantic(name: str, device: str, repeats: int) -> BenchRow:
    t_ours, t_ref, p_ours, p_ref = compare_sides(semantic_forwards, [name], device, repeats)
    return BenchRow(name, device, "1x3x520x520", t_ours, t_ref, p_ours, p_ref)


def family_benches() -> dict:
    """model name -> function(device, repeats) -> BenchRow, from each family's minseg_ref.bench_* module."""
    benches = {name: (lambda device, repeats, name=name: bench_semantic(name, device, repeats)) for name in SEMANTIC}
    for module_name in ["minseg_ref.bench_unet", "minseg_ref.bench_maskrcnn", "minseg_ref.bench_yolact", "minseg_ref.bench_panoptic"]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        benches.update(module.BENCHES)
    return benches


def run(models: list[str] | None, device: str = "cpu", ops: bool = False, repeats: int = 3,
        on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Benchmark `models` (all when None) in order; `on_row` gets each row as soon as it is measured, while a
    progress line on stderr (terminals only) names the model being timed and its time so far."""
    from minseg_ref.progress import Progress

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    benches = family_benches()
    unknown = [m for m in models or [] if m not in benches]
    if unknown:
        raise ValueError(f"no benchmark for {', '.join(unknown)}; available: {', '.join(benches)}")
    names = models or list(benches)
    rows = []
    with Progress(len(names) + ops) as progress:
        for i, name in enumerate(names, 1):
            progress.step(i, name)
            rows.append(benches[name](device, repeats))
            progress.clear()
            if on_row is not None:
                on_row(rows[-1])
        if ops:
            from minseg_ref.bench_ops import bench_ops

            progress.step(len(names) + 1, "operators (RoIAlign, NMS)")
            measured = [BenchRow(r["name"], device, r.get("input", ""), r["ours_ms"], r["original_ms"]) for r in bench_ops(device)]
            progress.clear()
            for row in measured:
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def format_header() -> str:
    header = f"{'model':<28} {'device':<6} {'input':<22} {'minseg ms':>10} {'original ms':>11} {'ratio':>6} {'peak MB (ours/orig)':>20}  note"
    return header + "\n" + "-" * len(header)


def format_row(r: BenchRow) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    peak = f"{fmt(r.ours_peak_mb, '.0f')}/{fmt(r.original_peak_mb, '.0f')}"
    return (f"{r.model:<28} {r.device:<6} {r.input:<22} {r.ours_ms:>10.1f} {fmt(r.original_ms, '11.1f'):>11} "
            f"{fmt(r.ratio, '.3f'):>6} {peak:>20}  {r.note}")


def format_footer(rows: list[BenchRow]) -> str:
    lines = ["ratio = minseg time / original time (median of interleaved runs; < 1 means minseg is faster)"]
    devices = {r.device for r in rows}
    if "cpu" in devices:
        lines.append("CPU peak MB = resident-set high-water mark of one forward minus the resident set before it "
                     "(after a warm-up, gc and malloc_trim; glibc mmap threshold fixed at 64 KiB; median of 3 calls), "
                     "each side alone in a fresh process")
    if "cuda" in devices:
        lines.append("CUDA peak MB = torch.cuda.max_memory_allocated during one forward minus memory_allocated before it")
    return "\n".join(lines)


def format_table(rows: list[BenchRow]) -> str:
    return "\n".join([format_header(), *map(format_row, rows), format_footer(rows)])
