"""Accumulation rule: totals over trailing windows from a cumulative counter (rain in the last 1 h, 3 h, 24 h).

The counter is unwrapped into a running total. When a reading is lower than the one before:
- if `modulus` is set and adding it gives a small increment (< modulus / 2), the counter wrapped;
- otherwise the counter was reset (power loss, a "clear rain" command) and restarted from zero, so the
  new reading is the amount since the reset.
The window sums are exact at reading times: total now − total at the newest reading at or before
now − window. A sum is only a lower bound while the history does not yet span the window (the first
readings after a start without saved history), and across a gap in the readings longer than half the
shortest window (a device offline, a long restart): what fell during the gap is booked at its start, since
nobody knows when it fell. A lower bound may raise a level but never lower one: the rule keeps its level
until the windows are whole again. The history is saved with the alarm state (gateway.rules.state), so an
ordinary restart continues the sums where they were.
Totals move at reading times only: a counter that stops reporting is a `stale` fault, not a dry spell.
A `fault.max_step` on this kind limits the *increment* between readings, not the raw counter change.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ._parse import Table
from .base import PointRule, restore_series, thin_series
from .errors import RuleStateError
from .common import LevelSpec, PointConfig, parse_levels, parse_point
from .levels import Level

KIND = "accumulation"

SAMPLE = """\
[[rules]]
kind = "accumulation"
id = "res.rain"
point = "rain.total"                # a cumulative counter, e.g. tipping-bucket mm
description = "Rainfall, CMA-style"
modulus = 429496729.6               # the counter wraps to 0 here (u32 × 0.1 mm); omit if it never wraps
# One table per (level, window). Any window can trip its level; the highest level tripped wins.
# Within one window_s, levels ascend and set values rise. clear defaults to set.
levels = [
  { level = "IV_BLUE",    window_s = 3600,  set = 30.0, clear = 25.0 },
  { level = "III_YELLOW", window_s = 10800, set = 50.0, clear = 45.0 },
  { level = "II_ORANGE",  window_s = 10800, set = 100.0, clear = 90.0 },
]
# on_delay_s = 0.0                  # or on_delay_count = 1
# off_delay_s = 0.0                 # or off_delay_count = 1
off_delay_s = 1800                  # keep the level 30 min after the rain eases
# latch = false
# window = { start = "06-01", end = "10-31", utc_offset = "+08:00" }
[rules.fault]
interval_s = 60
# stale_intervals = 3
max_step = 20.0                     # more than 20 mm between two readings is a glitch
# max_step_per_s = 60
# min = 0.0
# max = 429496729.6
# flags = []                        # status points: fault while true
# valid = []                        # status points: fault while false
"""


@dataclass(frozen=True, kw_only=True)
class Config(PointConfig):
    kind: ClassVar[str] = KIND
    modulus: float | None = None
    levels: tuple[LevelSpec, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one rule table; raises RuleConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_point(t, KIND)
        modulus = t.number("modulus", None, positive=True)
        levels = parse_levels(t, "levels", high=True, with_window=True)
        t.finish()
        return cls(**args, modulus=modulus, levels=levels)


_COMPACT_AT = 512


class AccumulationRule(PointRule):
    has_window = True

    def __init__(self, config: Config, resolve: Callable[[str], int]) -> None:
        super().__init__(config, resolve)
        self._modulus = config.modulus
        self._specs = config.levels
        self._windows_ms = {s.window_s: round(s.window_s * 1000) for s in config.levels}  # type: ignore[arg-type]
        self._horizon_ms = max(self._windows_ms.values())
        self._raw: float | None = None
        self._total = 0.0
        self._ts: list[int] = []  # reading times …
        self._tot: list[float] = []  # … and the running total after each
        self._lo = 0  # entries before _lo are older than every window needs
        self._sums: dict[float, float] = {}
        self._exact: dict[float, bool] = {}  # per window: the sum is exact (else a lower bound)
        self._first_ts: int | None = None  # since when the history runs without a gap
        self._gap: tuple[int, int] | None = None  # the last gap whose amount was booked at its start
        interval_ms = round((config.fault.interval_s or 0) * 3000)
        self._gap_ms = max(min(self._windows_ms.values()) // 2, interval_ms)
        self.counter_events = {"wrap": 0, "reset": 0}

    def _step(self, previous: float, value: float) -> float:
        return self._increment(previous, value, count=False)

    def _increment(self, previous: float, value: float, *, count: bool = True) -> float:
        delta = value - previous
        if delta >= 0:
            return delta
        if self._modulus is not None:
            wrapped = delta + self._modulus
            if 0 <= wrapped < self._modulus / 2:
                if count:
                    self.counter_events["wrap"] += 1
                return wrapped
        if count:
            self.counter_events["reset"] += 1
        return value  # restarted from zero: everything since the reset is new

    def _record(self, ts_ms: int, value: float) -> None:
        ts, tot = self._ts, self._tot
        if self._raw is not None:
            increment = self._increment(self._raw, value)
            if ts and ts_ms - ts[-1] > self._gap_ms and increment > 0:
                # When during the gap did it fall? Book it at the gap's start: sums of windows that begin
                # inside the gap are then lower bounds (they may raise, never clear).
                self._total += increment
                ts.append(ts[-1] + 1)
                tot.append(self._total)
                self._gap = (ts[-1], ts_ms)
            else:
                self._total += increment
        if self._first_ts is None:
            self._first_ts = ts_ms
        self._raw = value
        ts.append(ts_ms)
        tot.append(self._total)
        keep = bisect_right(ts, ts_ms - self._horizon_ms, self._lo) - 1
        if keep > self._lo:
            self._lo = keep
            if keep > _COMPACT_AT and keep * 2 > len(ts):
                del ts[:keep], tot[:keep]
                self._lo = 0
        lo = self._lo
        gap = self._gap
        for window_s, window_ms in self._windows_ms.items():
            start = ts_ms - window_ms
            i = bisect_right(ts, start, lo) - 1
            self._sums[window_s] = self._total - tot[i if i >= lo else lo]
            self._exact[window_s] = self._first_ts <= start and (gap is None or start <= gap[0] or start >= gap[1])

    def _move_window(self, move: Callable[[int], int]) -> None:
        self._ts = [move(ts) for ts in self._ts]
        if self._first_ts is not None:
            self._first_ts = move(self._first_ts)
        if self._gap is not None:
            self._gap = (move(self._gap[0]), move(self._gap[1]))

    def _export_window(self) -> dict[str, Any] | None:
        if self._raw is None:
            return None
        ts, tot = thin_series(self._ts[self._lo:], self._tot[self._lo:], self.MAX_SAVED_POINTS)
        return {"raw": self._raw, "total": self._total, "first_ts": self._first_ts, "ts": ts, "v": tot,
                "gap": list(self._gap) if self._gap else None}

    def restore_window(self, data: Mapping[str, Any], where: str) -> None:
        """Take back the saved counter, total and history (checked; RuleStateError names the bad key)."""
        ts, tot = restore_series(data, where, self.MAX_SAVED_POINTS)
        raw, total, first = data.get("raw"), data.get("total"), data.get("first_ts")
        gap = data.get("gap")
        if not ts or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (raw, total)):
            raise RuleStateError(f"{where}.raw", "expected numbers raw and total, and a history")
        if not (isinstance(first, int) and not isinstance(first, bool)):
            raise RuleStateError(f"{where}.first_ts", "expected epoch ms")
        if gap is not None and not (isinstance(gap, list) and len(gap) == 2 and all(isinstance(g, int) for g in gap)):
            raise RuleStateError(f"{where}.gap", "expected [start, end] or null")
        self._ts, self._tot, self._lo = ts, tot, 0
        self._raw, self._total, self._first_ts = float(raw), float(total), first
        self._gap = (gap[0], gap[1]) if gap else None

    def window_total(self, window_s: float) -> float | None:
        """The total over the last `window_s` seconds as of the latest reading (a configured window only)."""
        return self._sums.get(window_s)

    def _condition(self) -> int | None:
        sums = self._sums
        active = self.core.active
        best = 0
        for s in self._specs:
            lv = s.level
            if lv <= best:
                continue
            m = sums[s.window_s]  # type: ignore[index]
            if m >= s.set or (lv <= active and m >= s.clear):
                best = lv
        if best < active:
            # A lower bound below a level's clear value does not show the level is over.
            for s in self._specs:
                if best < s.level <= active and not self._exact[s.window_s]:  # type: ignore[index]
                    return None
        return best

    def _describe(self, level: Level) -> str:
        parts = ", ".join(f"{_window_text(w)} {self._sums.get(w, 0.0):g}" for w in self._windows_ms)
        text = f"{self.config.point} totals: {parts}"
        trips = [s for s in self._specs if s.level == level and self._sums.get(s.window_s, 0.0) >= s.clear]  # type: ignore[arg-type]
        if trips:
            s = trips[0]
            text += f" ({_window_text(s.window_s)} set ≥ {s.set:g}, clear ≥ {s.clear:g})"  # type: ignore[arg-type]
        return text


def _window_text(window_s: float) -> str:
    if window_s % 3600 == 0:
        return f"{window_s / 3600:g}h"
    if window_s % 60 == 0:
        return f"{window_s / 60:g}min"
    return f"{window_s:g}s"
