"""Time as a dependency: the only module that reads the system clocks or sleeps, so tests can drive time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time_ms(self) -> int:
        """Wall-clock time, epoch milliseconds (UTC): what readings are stamped with."""

    def monotonic(self) -> float:
        """Seconds on a clock that never steps: what schedules and timeouts use."""

    async def sleep(self, seconds: float) -> None:
        """Wait; cancellable."""


class SystemClock:
    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
