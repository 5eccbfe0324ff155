"""Supervision: every stage runs under a supervisor that restarts it when it fails, so no stage's bug, hang
or hostile input can end the gateway (and with it the polling and the alarms).

    supervisor.run("uplink", uplink.run)   # restarted with backoff when it raises; cancelled at stop

A stage that raises is logged (the traceback once per kind of error, then one line with the count),
counted, reported as a gateway fault, and started again after a backoff (0.5 s doubling to 30 s; reset
once a run has lasted `healthy_after_s`). Once a restarted stage has run `healthy_after_s` without
failing, the fault is cleared. A stage whose `probe` reports a problem (e.g. a disk write stuck for a
minute) is reported the same way, and cleared when the probe is happy again.

Core stages (the bus schedulers, the alarm ticker, the outputs) run under the same supervisor with a
short backoff: they are written never to raise, and this is the net under that promise.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .clock import Clock
from .health import Health

log = logging.getLogger("yujing.supervise")

Probe = Callable[[], str | None]  # None: healthy; else what is wrong


@dataclass
class StageStats:
    name: str
    core: bool
    starts: int = 0
    failures: int = 0
    last_error: str | None = None


class Supervisor:
    def __init__(self, clock: Clock, health: Health, *, backoff_min_s: float = 0.5, backoff_max_s: float = 30.0,
                 core_backoff_s: float = 0.1, healthy_after_s: float = 30.0) -> None:
        self.clock = clock
        self.health = health
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.core_backoff_s = core_backoff_s
        self.healthy_after_s = healthy_after_s
        self.stages: dict[str, StageStats] = {}
        self._logged: set[tuple[str, str]] = set()

    async def run(self, name: str, body: Callable[[], Awaitable[None]], *, core: bool = False) -> None:
        """Run `body()` until it returns (the stage finished) or this task is cancelled; restart it when
        it raises."""
        stats = self.stages.setdefault(name, StageStats(name, core))
        source = f"stage.{name}"
        attempt = 0
        while True:
            stats.starts += 1
            started = self.clock.monotonic()
            task = asyncio.ensure_future(body())
            try:
                if source in self.health.faults:
                    timer = asyncio.ensure_future(self.clock.sleep(self.healthy_after_s))
                    try:
                        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        timer.cancel()
                    if not task.done():
                        self.health.ok(source, f"{name} running again since {self.healthy_after_s:g} s")
                await task
                return
            except asyncio.CancelledError:
                task.cancel()
                raise
            except Exception as exc:
                stats.failures += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                if self.clock.monotonic() - started >= self.healthy_after_s:
                    attempt = 0
                delay = self.core_backoff_s if core else min(self.backoff_min_s * 2**attempt, self.backoff_max_s)
                attempt += 1
                self._log(name, exc, stats, delay)
                self.health.fault(source, f"{name} failed ({stats.failures} times): {stats.last_error[:200]}; "
                                          f"restarting in {delay:g} s")
            await self.clock.sleep(delay)

    def _log(self, name: str, exc: BaseException, stats: StageStats, delay: float) -> None:
        key = (name, type(exc).__name__)
        if key not in self._logged:
            self._logged.add(key)
            log.error("stage %s failed; restarting in %g s (polling and alarms go on):\n%s", name, delay,
                      "".join(traceback.format_exception(exc)).rstrip())
        else:
            log.error("stage %s failed again (%d times): %s; restarting in %g s", name, stats.failures, stats.last_error, delay)

    async def watch(self, probes: dict[str, Probe], every_s: float = 1.0) -> None:
        """Check each probe every `every_s`; report and clear what they find."""
        while True:
            for name, probe in probes.items():
                source = f"stage.{name}.probe"
                try:
                    problem = probe()
                except Exception as exc:
                    problem = f"probe failed: {type(exc).__name__}: {exc}"
                if problem is not None:
                    self.health.fault(source, f"{name}: {problem}")
                elif source in self.health.faults:
                    self.health.ok(source, f"{name}: healthy again")
            await self.clock.sleep(every_s)
