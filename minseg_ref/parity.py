"""`minseg parity`: every model against its original, one table. Each family module exposes
CHECKS: dict[model name, (original name, zero-argument function -> ParityRow)]."""
from __future__ import annotations

import importlib
import time

from minseg_ref.common import ParityRow

FAMILIES = [
    "minseg_ref.parity_semantic",
    "minseg_ref.parity_unet",
    "minseg_ref.parity_maskrcnn",
    "minseg_ref.parity_yolact",
    "minseg_ref.parity_panoptic",
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


def run(models: list[str] | None = None) -> list[ParityRow]:
    checks = all_checks()
    unknown = [m for m in models or [] if m not in checks]
    if unknown:
        raise ValueError(f"no parity check for {', '.join(unknown)}; available: {', '.join(checks)}")
    rows = []
    for model in models or list(checks):
        original, check = checks[model]
        start = time.perf_counter()
        try:
            row = check()
        except Exception as e:  # a check that cannot run is a failed row, with the reason
            row = ParityRow(model, original, float("nan"), float("nan"), False, f"{type(e).__name__}: {e}"[:160])
        row.detail = (row.detail + f" ({time.perf_counter() - start:.0f}s)").strip()
        rows.append(row)
    return rows


def format_table(rows: list[ParityRow]) -> str:
    header = f"{'model':<26} {'original':<44} {'max abs diff':>12} {'max rel diff':>12}  result"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.model:<26} {r.original:<44} {r.max_abs:>12.3g} {r.max_rel:>12.3g}  "
                     f"{'pass' if r.passed else 'FAIL'}  {r.detail}")
    return "\n".join(lines)
