"""Progress display: a redrawn bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last_line = 0.0
        self._last = (self.start, 0)
        self._rate = 0.0

    def update(self, done: int, sources: Mapping[str, int] | None = None) -> None:
        now = time.monotonic()
        then, before = self._last
        if now - then >= 0.5:
            self._rate = (done - before) / (now - then)
            self._last = (now, done)
        elif self._rate == 0.0 and now > self.start:
            self._rate = done / (now - self.start)
        frac = min(1.0, done / self.total)
        eta = (self.total - done) / self._rate if self._rate > 0 else None
        parts = [
            f"{self.label} {frac * 100:5.1f}%",
            f"{human(done)}/{human(self.total)}",
            f"{human(self._rate)}/s",
        ]
        if sources:
            parts.append(" ".join(f"{k} {human(v)}" for k, v in sorted(sources.items())))
        parts.append(f"eta {eta:.0f}s" if eta is not None else "eta -")
        if self.tty:
            width = 24
            bar = "#" * int(frac * width)
            self.stream.write(f"\r[{bar:<{width}}] " + "  ".join(parts) + "\x1b[K")
            self.stream.flush()
        elif now - self._last_line >= 2.0 or done >= self.total:
            self._last_line = now
            self.stream.write("  ".join(parts) + "\n")
            self.stream.flush()

    def finish(self, message: str = "") -> None:
        if self.tty:
            self.stream.write("\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
