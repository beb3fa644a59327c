"""One progress line per phase on stderr: records done, records/s, ETA (redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, every_s: float = 1.0) -> None:
        # Looked up now, not at import: whoever replaced sys.stderr since (a test's capture) is written to.
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.tty = self.stream.isatty()
        self.phase = ""
        self.started = 0.0
        self.shown = 0.0

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if phase != self.phase:
            if self.phase and self.tty:
                self.stream.write("\n")
            self.phase, self.started, self.shown = phase, now, 0.0
        finished = total is not None and done >= total
        if not finished and now - self.shown < self.every_s:
            return
        self.shown = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed >= 0.05 else 0.0  # no rate from a phase too short to time
        eta = f", ETA {(total - done) / rate:.1f}s" if total is not None and rate > 0 and not finished else ""
        of = f"/{total:,}" if total is not None else ""
        speed = f", {rate:,.0f} events/s" if rate else ""
        line = f"{phase:<9} {done:,}{of} events{speed}{eta}"
        self.stream.write(f"\r{line:<72}" if self.tty else line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.phase and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.phase = ""
