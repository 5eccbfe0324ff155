"""Rate-of-change rule: how fast a value moves over a trailing time window, in units per `per_s`.

Examples: reservoir rise ≥ 0.10 m/h → yellow, ≥ 0.30 m/h → orange (window 1 h, per 3600 s); a crack
meter opening ≥ 2 mm/day → yellow, ≥ 10 mm/day → orange (window 1 day, per 86400 s).

The rate is (newest − oldest) / (their time apart), using the oldest accepted reading inside the window.
Until the readings span `min_span_s` the rule has no opinion and keeps its level (so a restart during a
flood neither clears nor invents an alarm).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ._parse import Table
from .base import PointRule, restore_series, thin_series
from .errors import RuleConfigError
from .common import LevelSpec, PointConfig, ladder, parse_levels, parse_point, spec_for
from .levels import Level

KIND = "rate"

SAMPLE = """\
[[rules]]
kind = "rate"
id = "res.zu.rise"
point = "radar.ZU"
description = "Reservoir rising fast"
window_s = 3600                     # trailing window the rate is measured over
per_s = 3600                        # rate unit: change per hour (86400 for per day)
# min_span_s = 1800                 # need readings this far apart first (default window_s / 2)
direction = "rise"                  # "rise", "fall" or "both" (absolute rate)
# Rates are compared as positive magnitudes in `direction`; hysteresis as for a high threshold.
levels = [
  { level = "III_YELLOW", set = 0.10, clear = 0.08 },
  { level = "II_ORANGE",  set = 0.30, clear = 0.25 },
]
on_delay_count = 2                  # 2-sample confirmation
# on_delay_s = 0.0
# off_delay_s = 0.0
# off_delay_count = 1
# latch = false
# window = { start = "06-01", end = "10-31", utc_offset = "+08:00" }
[rules.fault]
interval_s = 60
# stale_intervals = 3
max_step = 0.5                      # a level jump > 0.5 m/min is a sensor glitch: fault, not alarm
max_step_per_s = 60
# min = 1941.0
# max = 1963.0
# flags = []                        # status points: fault while true
# valid = []                        # status points: fault while false
"""


@dataclass(frozen=True, kw_only=True)
class Config(PointConfig):
    kind: ClassVar[str] = KIND
    window_s: float
    per_s: float
    min_span_s: float
    direction: str = "rise"
    levels: tuple[LevelSpec, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one rule table; raises RuleConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_point(t, KIND)
        window_s = t.number("window_s", positive=True)
        per_s = t.number("per_s", positive=True)
        min_span_s = t.number("min_span_s", window_s / 2, positive=True)
        if min_span_s > window_s:
            raise t.error("min_span_s", f"must be ≤ window_s ({window_s:g}), got {min_span_s:g}")
        direction = t.string("direction", "rise", choices=("rise", "fall", "both"))
        levels = parse_levels(t, "levels", high=True)
        for i, spec in enumerate(levels):
            if spec.set <= 0:
                raise RuleConfigError(
                    f"{t.at('levels')}[{i}].set",
                    f"a rate threshold is a magnitude in the {direction!r} direction and must be > 0",
                )
        t.finish()
        return cls(**args, window_s=window_s, per_s=per_s, min_span_s=min_span_s, direction=direction, levels=levels)


class RateRule(PointRule):
    has_window = True

    def __init__(self, config: Config, resolve: Callable[[str], int]) -> None:
        super().__init__(config, resolve)
        self._specs = config.levels
        self._window_ms = round(config.window_s * 1000)
        self._min_span_ms = round(config.min_span_s * 1000)
        self._per_ms = config.per_s * 1000
        self._sign = {"rise": 1.0, "fall": -1.0, "both": 0.0}[config.direction]
        self._history: deque[tuple[int, float]] = deque()
        self._rate: float | None = None  # signed, in units per per_s

    def _record(self, ts_ms: int, value: float) -> None:
        history = self._history
        history.append((ts_ms, value))
        horizon = ts_ms - self._window_ms
        while history[0][0] < horizon:
            history.popleft()
        t0, x0 = history[0]
        span = ts_ms - t0
        self._rate = (value - x0) / span * self._per_ms if span >= self._min_span_ms and span > 0 else None

    def _move_window(self, move: Callable[[int], int]) -> None:
        self._history = deque((move(ts), v) for ts, v in self._history)

    def _export_window(self) -> dict[str, Any] | None:
        if not self._history:
            return None
        ts, values = thin_series([t for t, _ in self._history], [v for _, v in self._history], self.MAX_SAVED_POINTS)
        return {"ts": ts, "v": values}

    def restore_window(self, data: Mapping[str, Any], where: str) -> None:
        """Take back the saved history (checked; RuleStateError names the bad key)."""
        ts, values = restore_series(data, where, self.MAX_SAVED_POINTS)
        self._history = deque(zip(ts, values))

    def _condition(self) -> int | None:
        rate = self._rate
        if rate is None:
            return None
        measure = abs(rate) if self._sign == 0.0 else rate * self._sign
        return ladder(self._specs, measure, self.core.active)

    def _describe(self, level: Level) -> str:
        unit = _per_text(self.config.per_s)
        rate = "n/a" if self._rate is None else f"{self._rate:+.4g}"
        text = f"{self.config.point} changing {rate}{unit} over {self.config.window_s:g} s ({self.config.direction})"
        spec = spec_for(self._specs, level)
        if spec is not None:
            text += f"; set ≥ {spec.set:g}{unit}, clear ≥ {spec.clear:g}{unit}"
        return text


def _per_text(per_s: float) -> str:
    return {1.0: "/s", 60.0: "/min", 3600.0: "/h", 86400.0: "/day"}.get(per_s, f"/{per_s:g}s")
