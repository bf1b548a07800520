"""Log lines that callers can trigger, without letting them flood the log.

A caller can make the daemon log at will (a refused mutating call, a model failing on the
inputs it sent, the model runtime printing every failed run): each kind of line is logged
the first time, then at most once per interval with the count of those held back meanwhile.
One :class:`OncePerInterval` per place that logs; the key names the kind of line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Kinds of line remembered at once; past this the oldest is forgotten (keys come from
# callers: model names, runtime output).
MAX_KEYS = 1024


class OncePerInterval:
    INTERVAL_S = 60.0

    def __init__(self, interval_s: float | None = None):
        self.interval_s = self.INTERVAL_S if interval_s is None else interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def note(self, key: str, emit: Callable[[str], None]) -> None:
        """Calls ``emit(more)`` unless a line of this ``key`` went out less than an interval
        ago; ``more`` is "" or " (N more since the last such line)"."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return
            if last is None and len(self._last) >= MAX_KEYS:
                oldest = next(iter(self._last))
                self._last.pop(oldest)
                self._held.pop(oldest, None)
            self._last.pop(key, None)  # re-inserted last: the dict stays oldest-first
            self._last[key] = now
            held = self._held.pop(key, 0)
        emit(f" ({held} more since the last such line)" if held else "")

    def expire(self) -> None:
        """Forgets when lines went out (for tests: as if an interval had passed)."""
        with self._lock:
            self._last.clear()
