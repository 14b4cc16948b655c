"""A run's record: the log.jsonl lines, the progress line on stderr, and loss.png drawn with PIL."""
from __future__ import annotations

import io
import json
import sys
import time

from PIL import Image, ImageDraw

META_KEYS = ("step", "lr", "seconds", "data_seconds")  # every other key of a log line is a loss
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One stderr line per logged step: step/total, total loss and each loss, lr, images/s, ETA."""

    def __init__(self, total: int, start_step: int, global_batch: int):
        self.total, self.global_batch = total, global_batch
        self.t0, self.step0 = time.perf_counter(), start_step

    def show(self, line: dict) -> None:
        done = line["step"] - self.step0
        elapsed = time.perf_counter() - self.t0
        rate = done * self.global_batch / elapsed if elapsed > 0 else 0.0
        eta = (self.total - line["step"]) * elapsed / done if done else 0.0
        losses = "  ".join(f"{k} {v:.4f}" for k, v in line.items() if k not in META_KEYS)
        print(f"step {line['step']}/{self.total}  {losses}  lr {line['lr']:.3g}  {rate:.1f} img/s  "
              f"ETA {format_duration(eta)}", file=sys.stderr, flush=True)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def read_jsonl(data: str, up_to: int) -> list[dict]:
    """The lines of a saved log whose step is at most `up_to` (a resumed run continues after them)."""
    return [line for line in map(json.loads, data.splitlines()) if line["step"] <= up_to]


def loss_plot(lines: list[dict], width: int = 800, height: int = 480) -> bytes:
    """PNG bytes: every loss (and their sum, "loss") against the step, a shared linear y axis from 0."""
    margin = 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    names = [k for k in (lines[0] if lines else {}) if k not in META_KEYS]
    steps = [line["step"] for line in lines]
    top = max([line[k] for line in lines for k in names if line[k] == line[k]] + [1e-12])  # NaN skipped
    x0, x1, y0, y1 = margin, width - 20, height - margin, 20
    draw.rectangle([x0, y1, x1, y0], outline="black")
    s_lo, s_hi = (min(steps), max(steps)) if steps else (0, 1)
    sx = lambda s: x0 + (s - s_lo) / max(s_hi - s_lo, 1) * (x1 - x0)
    sy = lambda v: y0 - v / top * (y0 - y1)
    for frac in (0, 0.5, 1):
        draw.text((5, sy(frac * top) - 6), f"{frac * top:.3g}", fill="black")
        draw.text((sx(s_lo + frac * (s_hi - s_lo)) - 10, y0 + 8), f"{int(s_lo + frac * (s_hi - s_lo))}", fill="black")
    draw.text(((x0 + x1) // 2 - 10, height - 25), "step", fill="black")
    for i, name in enumerate(names):
        colour = COLOURS[i % len(COLOURS)]
        points = [(sx(line["step"]), sy(line[name])) for line in lines if line[name] == line[name]]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((x1 - 160, y1 + 8 + 14 * i), name, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
