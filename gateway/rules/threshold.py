"""Threshold rule: a value above (or below) per-level set points, with hysteresis and delays.

Examples: reservoir level ZU ≥ 1953.50 m (汛限) → III yellow; O₂ ≤ 19.5 %VOL → yellow (a low threshold);
combustible gas ≥ 25 %LEL → yellow, ≥ 50 %LEL → orange, latched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..model import Value
from ._parse import Table
from .base import OWN_INPUT, PointRule, as_number
from .common import LevelSpec, PointConfig, ladder, parse_levels, parse_point, spec_for
from .levels import Level, Transition

KIND = "threshold"

SAMPLE = """\
[[rules]]
kind = "threshold"
id = "res.zu.flood_season"          # unique; letters, digits and _ . -
point = "radar.ZU"                  # a point name the gateway's catalogue resolves
description = "Reservoir level against 汛限水位 (flood season only)"
direction = "high"                  # "high": alarm at value >= set; "low": alarm at value <= set
# One table per level, levels ascending. Enter at `set`; leave once past `clear` (hysteresis).
# `clear` defaults to `set` (no hysteresis). High: clear <= set. Low: clear >= set.
levels = [
  { level = "IV_BLUE",    set = 1953.20, clear = 1953.15 },
  { level = "III_YELLOW", set = 1953.50, clear = 1953.45 },
]
# Raise only after the condition held this long (seconds) OR for this many consecutive readings:
on_delay_count = 2
# on_delay_s = 0.0
# Lower or clear only after the condition has been below for this long OR this many readings:
# off_delay_s = 0.0
# off_delay_count = 1
# latch = false                     # true: keep the highest level until acknowledged
# "fault": the reading is a fault (default); "raise_only": an OUT_OF_RANGE reading is still
# evaluated but may only raise or hold the level (fail-safe for an over-range gas head).
# out_of_range = "fault"
# Active only inside this yearly window (local time); outside it the rule is inactive and clears.
window = { start = "06-01", end = "10-31", utc_offset = "+08:00" }   # also "MM-DD HH:MM"
[rules.fault]
interval_s = 60                     # expected time between readings; enables the stale check
# stale_intervals = 3               # fault after this many intervals without a reading
max_step = 0.5                      # a jump larger than this between readings is a fault, not an alarm
max_step_per_s = 60                 # … per 60 s: the allowance grows for longer gaps (0.5 m/min)
min = 1941.0                        # plausible range of the value (else fault)
max = 1963.0
# Status points of the same device: fault while any `flags` point is true or any `valid` point is
# false (e.g. a gas module's sensor_lost and status_valid bits), and the value is not used meanwhile.
# flags = []
# valid = []
"""


@dataclass(frozen=True, kw_only=True)
class Config(PointConfig):
    kind: ClassVar[str] = KIND
    direction: str = "high"
    levels: tuple[LevelSpec, ...]
    out_of_range: str = "fault"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one rule table; raises RuleConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_point(t, KIND)
        direction = t.string("direction", "high", choices=("high", "low"))
        levels = parse_levels(t, "levels", high=direction == "high")
        out_of_range = t.string("out_of_range", "fault", choices=("fault", "raise_only"))
        t.finish()
        return cls(**args, direction=direction, levels=levels, out_of_range=out_of_range)


class ThresholdRule(PointRule):
    def __init__(self, config: Config, resolve: Callable[[str], int]) -> None:
        super().__init__(config, resolve)
        self._specs = config.levels
        self._high = config.direction == "high"
        self._raise_only_out_of_range = config.out_of_range == "raise_only"
        self._x = 0.0
        self._op = "≥" if self._high else "≤"

    def _record(self, ts_ms: int, value: float) -> None:
        self._x = value

    def _condition(self) -> int:
        return ladder(self._specs, self._x, self.core.active, self._high)

    def _describe(self, level: Level) -> str:
        spec = spec_for(self._specs, level)
        name = self.config.point
        if spec is None:
            back = "below" if self._high else "above"
            return f"{name} = {self._x:g}, {back} every clear value"
        return f"{name} = {self._x:g} (set {self._op} {spec.set:g}, clear {self._op} {spec.clear:g})"

    def _evaluate_out_of_range(self, ts: int, value: Value, values: Mapping[int, Value]) -> list[Transition]:
        core = self.core
        x = as_number(value)
        if x is not None and (self._gate is None or self._gate.contains(ts)):
            cond = ladder(self._specs, x, core.active, self._high)
            # An out-of-range reading may raise or hold an alarm (a gas head past full scale), but one that
            # supports no level at all is a broken loop (2 mA reads as −12.5 %LEL): a fault, never "clear".
            if cond >= core.active and cond > Level.NONE:
                self._x = x
                self.last_values = values
                return core.observe(cond, ts, values, self._describe)
        return self._fault_on(OWN_INPUT, f"bad quality: out_of_range (value {value!r} would not raise the alarm)", ts, values)
