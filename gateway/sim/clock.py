"""A wall clock a test (or the demo) can step, as a board without a real-time clock sees it.

`SteppableClock()` starts where a Raspberry Pi's clock starts after power-on: 1970-01-01 plus the time since
boot (the monotonic clock); `step(ms)` and `set_to(ms)` move it as NTP, GPS or an operator would. Monotonic
time and sleeping stay real, so everything that measures durations runs exactly as in production.
"""

from __future__ import annotations

import asyncio
import threading
import time


class SteppableClock:
    def __init__(self, start_ms: int | None = None) -> None:
        now = self._mono_ms()
        self._offset = 0 if start_ms is None else start_ms - now  # wall = monotonic ms + offset
        self._lock = threading.Lock()  # the gateway's storage thread reads it too
        self.steps: list[tuple[float, int]] = []  # (monotonic s, ms) of every step applied

    @staticmethod
    def _mono_ms() -> int:
        return time.monotonic_ns() // 1_000_000

    def time_ms(self) -> int:
        with self._lock:
            return self._mono_ms() + self._offset

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def step(self, delta_ms: int) -> None:
        """Jump by `delta_ms` (negative: backwards)."""
        with self._lock:
            self._offset += delta_ms
            self.steps.append((time.monotonic(), delta_ms))

    def set_to(self, wall_ms: int) -> int:
        """Jump to `wall_ms` (what NTP's first synchronisation does); returns the step applied."""
        delta = wall_ms - self.time_ms()
        self.step(delta)
        return delta
