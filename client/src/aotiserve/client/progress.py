"""A one-line progress bar on stderr for uploads (drawn only on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_MIB = 1 << 20


class ProgressBar:
    """``bar(sent, total)`` redraws at most 10 times a second; ``close()`` ends the line."""

    def __init__(
        self, label: str, stream: TextIO | None = None, enabled: bool | None = None, width: int = 30
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self.sent = self.total = 0

    def __call__(self, sent: int, total: int) -> None:
        self.sent, self.total = sent, total
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= 0.1 or sent >= total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.sent / self.total if self.total else 1.0
        filled = int(frac * self.width)
        elapsed = max(now - self._started, 1e-9)
        rate = self.sent / elapsed / _MIB
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}% "
            f"{self.sent / _MIB:.1f}/{self.total / _MIB:.1f} MiB {rate:.0f} MiB/s"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
