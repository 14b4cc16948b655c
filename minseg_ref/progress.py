"""A one-line progress status on stderr ("[3/13] maskrcnn_resnet50_fpn ... 41s"), rewritten in place every
second while a long step runs; silent when stderr is not a terminal (logs and pipes get only the results)."""
from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.text, self.started = "", 0.0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None

    def step(self, index: int, what: str) -> None:
        """Show step `index` (from 1) of `total`, `what` is running; the elapsed time ticks until clear()."""
        if not self.enabled:
            return
        self.text, self.started = f"[{index}/{self.total}] {what} ...", time.perf_counter()
        self._draw()
        if self.thread is None:
            self.thread = threading.Thread(target=self._tick, daemon=True)
            self.thread.start()

    def clear(self) -> None:
        """Erase the status line (before a result line is printed)."""
        if not self.enabled:
            return
        with self.lock:
            self.text = ""
            self.stream.write("\r\033[K")
            self.stream.flush()

    def close(self) -> None:
        self.stop.set()
        self.clear()

    def _draw(self) -> None:
        with self.lock:
            if self.text:
                self.stream.write(f"\r\033[K{self.text} {time.perf_counter() - self.started:.0f}s")
                self.stream.flush()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self._draw()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
