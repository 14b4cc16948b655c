"""`minseg parity`: every model against its original, one table. Each family module exposes
CHECKS: dict[model name, (original name, zero-argument function -> ParityRow)]."""
from __future__ import annotations

import importlib
import math
import time
from typing import Callable

from minseg_ref.common import ParityRow
from minseg_ref.progress import Progress

FAMILIES = [
    "minseg_ref.parity_semantic",
    "minseg_ref.parity_unet",
    "minseg_ref.parity_maskrcnn",
    "minseg_ref.parity_yolact",
    "minseg_ref.parity_panoptic",
    "minseg_ref.parity_structure",
    "minseg_ref.parity_train",  # train mode: loss, gradients, weights after 3 SGD steps (rows "<model>:train")
]


def all_checks() -> dict:
    checks = {}
    for name in FAMILIES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # family not built yet
            raise
        checks.update(module.CHECKS)
    return checks


def run(models: list[str] | None = None, on_row: Callable[[ParityRow], None] | None = None) -> list[ParityRow]:
    """Run the checks of `models` (all when None) in order; `on_row` gets each row as soon as it is known,
    while a progress line on stderr (terminals only) names the check running and its time so far."""
    checks = all_checks()
    unknown = [m for m in models or [] if m not in checks]
    if unknown:
        raise ValueError(f"no parity check for {', '.join(unknown)}; available: {', '.join(checks)}")
    rows = []
    names = models or list(checks)
    with Progress(len(names)) as progress:
        for i, model in enumerate(names, 1):
            original, check = checks[model]
            progress.step(i, model)
            start = time.perf_counter()
            try:
                row = check()
            except Exception as e:  # a check that cannot run is a failed row, with the reason
                row = ParityRow(model, original, float("nan"), float("nan"), False, f"{type(e).__name__}: {e}"[:160])
            row.detail = (row.detail + f" ({time.perf_counter() - start:.0f}s)").strip()
            rows.append(row)
            progress.clear()
            if on_row is not None:
                on_row(row)
    return rows


def format_header() -> str:
    header = f"{'model':<26} {'original':<44} {'checks':<14} {'max abs diff':>12} {'max rel diff':>12}  result"
    return header + "\n" + "-" * len(header)


def format_row(r: ParityRow) -> str:
    number = lambda v: f"{'-' if math.isnan(v) else format(v, '.3g'):>12}"  # "-": nothing numeric compared
    return (f"{r.model:<26} {r.original:<44} {r.checks:<14} {number(r.max_abs)} {number(r.max_rel)}  "
            f"{'pass' if r.passed else 'FAIL'}  {r.detail}")


FOOTER = ("checks: \"numbers\" compares minseg's outputs with the original's (run here, or recorded from it) on the "
          "same weights and input; \"structure only\" means no outputs of that original exist here, so only its "
          "checkpoint's keys, shapes and parameter count (and a forward that runs) are checked")


def format_table(rows: list[ParityRow]) -> str:
    return "\n".join([format_header(), *map(format_row, rows), FOOTER])
