"""Is the wall clock set, and did it step? A Raspberry Pi has no RTC: it boots with the clock at 1970 (or
at fake-hwclock's last save) until NTP steps it, and NTP, an operator or a GPS can step it again, backwards
as well. Readings are stamped with the wall clock (that is what the platform stores); everything that
measures a duration must not notice a step (schedules and timeouts run on the monotonic clock; the rule
engine is moved with the step, gateway.alarms).

- *Unset*: the wall clock reads before CLOCK_FLOOR_MS (2025-01-01T00:00:00Z, before this software's
  first release: no correct clock of a gateway running it can read earlier). Readings and events stamped
  then are sealed in messages flagged `6: true` (clock unset, docs/wire-format.md), never together with
  readings stamped after it was set; the flag follows from the stamp alone, so the spool needs no new field.
- *Step*: the wall clock moved more than STEP_MS (100 ms, or 0.1 % of the time elapsed: NTP's slew bound
  is 0.05 %) away from where the monotonic clock says it should be. ClockWatch sees it at the next stamp
  and keeps it, numbered, for whoever must react (the rule engine, the bus scheduler re-stamping a poll
  that was in flight, the gateway's fault report).

fake-hwclock boots the clock at its last save, after the floor: such readings are not flagged unset, but
NTP's later step is reported (`gateway.clock.step`, with its size) so the platform can re-time them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

from .clock import Clock

CLOCK_FLOOR_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
# ntpd steps from 128 ms, chrony (makestep) from 1 s, systemd-timesyncd from 400 ms; smaller corrections are
# slewed. Two reads of the clocks in one call are a few microseconds apart (a call preempted between them
# is not judged).
STEP_MS = 100
READ_SKEW_S = 0.005
MAX_KEPT = 256  # steps remembered (a clock stepping more often than this between two polls is broken anyway)


def clock_unset(ts_ms: int) -> bool:
    """Whether a stamp was taken while the wall clock was not set (before CLOCK_FLOOR_MS)."""
    return ts_ms < CLOCK_FLOOR_MS


def iso(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_ms // 1000))


@dataclass(frozen=True, slots=True)
class Step:
    number: int  # 1, 2, … in the order seen
    delta_ms: int  # how far the wall clock jumped (negative: backwards)
    before_ms: int  # where it would have been without the step
    after_ms: int  # where it was when the step was seen

    @property
    def sets(self) -> bool:
        """It took the clock from unset to set (NTP's first synchronisation after boot)."""
        return clock_unset(self.before_ms) and not clock_unset(self.after_ms)

    @property
    def unsets(self) -> bool:
        return not clock_unset(self.before_ms) and clock_unset(self.after_ms)

    def describe(self) -> str:
        """What the gateway reports: the size in a fixed form the platform may parse: `stepped by ±N ms`."""
        return (f"wall clock stepped by {self.delta_ms:+d} ms (from {iso(self.before_ms)} to {iso(self.after_ms)})"
                + ("; readings stamped before this are flagged clock-unset" if self.sets else ""))


class ClockWatch:
    """A Clock (what readings are stamped with) that notices steps of the wall clock.

    Every `time_ms()` compares the wall clock's progress with the monotonic clock's since the previous
    call; the gateway stamps every poll and ticks its alarms every second, so a step is seen at the
    first stamp after it. Thread-safe: the storage thread reads the time too.
    """

    def __init__(self, inner: Clock, *, step_ms: int = STEP_MS) -> None:
        self.inner = inner
        self.step_ms = step_ms
        self._lock = threading.Lock()
        self._steps: list[Step] = []
        self.count = 0  # steps seen so far; Step.number of the newest
        self._wall = inner.time_ms()
        self._mono = inner.monotonic()

    # -- Clock ------------------------------------------------------------------------------------------

    def time_ms(self) -> int:
        return self.stamp()[0]

    def stamp(self) -> tuple[int, int]:
        """(wall time, steps seen so far), read together: see `restamp`."""
        with self._lock:
            mono0 = self.inner.monotonic()
            wall = self.inner.time_ms()
            mono = self.inner.monotonic()
            if mono - mono0 > READ_SKEW_S:  # preempted between the reads: the pair says nothing, judge next time
                return wall, self.count
            elapsed_ms = (mono - self._mono) * 1000
            expected = self._wall + round(elapsed_ms)
            if abs(wall - expected) > max(self.step_ms, elapsed_ms / 1000):
                self.count += 1
                self._steps.append(Step(self.count, wall - expected, expected, wall))
                del self._steps[:-MAX_KEPT]
            self._wall, self._mono = wall, mono
            return wall, self.count

    def monotonic(self) -> float:
        return self.inner.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)

    # -- steps --------------------------------------------------------------------------------------------

    @property
    def unset(self) -> bool:
        """The wall clock read before the floor at the last stamp."""
        return clock_unset(self._wall)

    def steps_after(self, number: int) -> list[Step]:
        """The steps seen after step `number` (0: all that are still remembered), oldest first."""
        with self._lock:
            return [s for s in self._steps if s.number > number]

    def shift_since(self, number: int) -> int:
        """How far the wall clock has stepped since step `number` was the newest (the sum of the steps):
        what to add to a stamp taken then to have it on today's clock."""
        return sum(s.delta_ms for s in self.steps_after(number))


class StepCursor:
    """One reader's place in a ClockWatch's steps: `new()` returns each step once."""

    def __init__(self, watch: ClockWatch) -> None:
        self.watch = watch
        self.seen = watch.count

    def new(self) -> list[Step]:
        if self.watch.count == self.seen:  # the common case: no lock, no list
            return []
        steps = self.watch.steps_after(self.seen)
        self.seen = steps[-1].number if steps else self.watch.count
        return steps


def stamp(clock: Clock) -> tuple[int, int]:
    """(wall time, steps the clock has seen so far; 0 for a clock that does not watch for steps)."""
    return clock.stamp() if isinstance(clock, ClockWatch) else (clock.time_ms(), 0)


def restamp(clock: Clock, ts_ms: int, since: int) -> int:
    """A stamp taken by `stamp(clock)` when the clock had seen `since` steps, on the clock as it reads now: a
    poll that was in flight while the clock stepped is stamped as if the step had come before it (what the
    new, better clock says), so a reading is never on the far side of a step from the readings polled
    after it, and the rules, moved with the step (gateway.alarms), see it in its right place."""
    if not isinstance(clock, ClockWatch):
        return ts_ms
    clock.time_ms()  # notice a step that came during the poll
    return ts_ms + clock.shift_since(since) if clock.count != since else ts_ms


class _Engine(Protocol):
    def newest_time(self) -> int | None: ...

    def shift_time(self, delta_ms: int, *, before_ms: int | None = None) -> None: ...


def place_restored(engine: _Engine, now_ms: int) -> int:
    """A gateway that boots with its clock unset restores rule state (rate and rain histories, alarm times)
    stamped on a set clock — or on the previous boot's longer uptime — in its "future": a rate over that
    history has a negative span (no rate: the rule is blind) and rain windows lose their order. Place it just
    before now, as if the gateway had been off for no time (the real length is unknown until NTP): rates and
    sums may come out high, never low — a possible early raise, not a missed one. When NTP sets the clock it
    moves with the rest. Call it at start, before the first reading; returns the shift (0: none needed)."""
    newest = engine.newest_time()
    if newest is None or not clock_unset(now_ms) or newest < now_ms:
        return 0
    delta = now_ms - 1 - newest
    engine.shift_time(delta)
    return delta


class _Health(Protocol):
    def fault(self, source: str, message: str) -> None: ...

    def ok(self, source: str, message: str) -> None: ...

    def note(self, source: str, message: str) -> None: ...


def clock_unset_message(now_ms: int) -> str:
    return (f"wall clock not set: it reads {iso(now_ms)}, before {iso(CLOCK_FLOOR_MS)} (no RTC, NTP not synchronised "
            "yet); readings and events stamped now are flagged clock-unset (key 6) until it is")


def report_step(health: _Health, step: Step) -> None:
    """A step as a gateway event: setting the clock clears the `clock` fault raised at start, losing it
    raises it again; any other step is a one-off `gateway.clock.step` (the platform may re-time readings
    of this session stamped before it by the size the message gives: `stepped by ±N ms`)."""
    if step.sets and "clock" in getattr(health, "faults", {"clock": ""}):
        health.ok("clock", step.describe())
    elif step.unsets:
        health.fault("clock", f"{step.describe()}; {clock_unset_message(step.after_ms)}")
    else:
        health.note("clock.step", step.describe())
