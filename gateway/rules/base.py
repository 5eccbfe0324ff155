"""What every rule on one catalogue point does before its kind's arithmetic: drop duplicate and
out-of-order readings, turn bad quality, non-numbers, implausible values and silence into a fault, and
honour the rule's time window. A kind subclasses `PointRule` and implements `_record`, `_condition` and
`_describe`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from ..model import Quality, Reading, Value, quality_name
from .common import PointConfig, WindowGate
from .core import AlarmCore
from .levels import AlarmState, Level, Transition

_EMPTY: Mapping[int, Value] = {}


def as_number(value: Value) -> float | None:
    """A reading value as a finite float, or None if it is not a number (None, NaN, ±inf, text)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float, Decimal)):
        try:
            number = float(value)
        except (OverflowError, ValueError):
            return None
        return number if math.isfinite(number) else None
    return None


class PointRule:
    """Base of the rules that watch one point. Synchronous and pure; time comes from the caller."""

    # set by a kind that may evaluate OUT_OF_RANGE readings that raise (see threshold.Config.out_of_range)
    _raise_only_out_of_range = False

    def __init__(self, config: PointConfig, point: int) -> None:
        self.config = config
        self.id = config.id
        self.point = point
        self.points: tuple[int, ...] = (point,)
        self.depends: tuple[str, ...] = ()
        self.core = AlarmCore(
            config.id,
            latch=config.latch,
            on_delay_s=config.on_delay_s,
            on_delay_count=config.on_delay_count,
            off_delay_s=config.off_delay_s,
            off_delay_count=config.off_delay_count,
        )
        self._gate = WindowGate(config.window) if config.window is not None else None
        self._in_window = True
        fault = config.fault
        self._stale_ms = fault.stale_after_ms
        self._max_step = fault.max_step
        self._max_step_per_ms = fault.max_step_per_s * 1000 if fault.max_step_per_s else None
        self._min = fault.min
        self._max = fault.max
        self._t0: int | None = None  # first time this rule saw (for staleness of a point never read)
        self._last_seen: int | None = None  # latest reading of any quality
        self._accepted_ts: int | None = None
        self._accepted: float | None = None
        self.last_values: Mapping[int, Value] = _EMPTY

    # -- the Rule interface ---------------------------------------------------------------------------

    @property
    def level(self) -> Level:
        return self.core.level

    def evaluate(self, reading: Reading) -> list[Transition]:
        """Evaluate one reading of this rule's point and return the transitions it causes.

        A reading no newer than the last one is ignored. A bad one (quality, not a number, out of the
        plausible range, an implausible step) raises a fault and keeps the level; the next good one clears it.
        """
        ts = reading.ts_ms
        if self._last_seen is not None and ts <= self._last_seen:
            return []
        self._last_seen = ts
        if self._t0 is None:
            self._t0 = ts
        values = {self.point: reading.value}
        core = self.core
        quality = reading.quality
        if quality != Quality.GOOD:
            if quality == Quality.OUT_OF_RANGE and self._raise_only_out_of_range:
                return self._evaluate_out_of_range(ts, reading.value, values)
            return core.set_fault(f"bad quality: {quality_name(quality)}", ts, values)
        x = as_number(reading.value)
        if x is None:
            return core.set_fault(f"value {reading.value!r} is not a finite number", ts, values)
        if (self._min is not None and x < self._min) or (self._max is not None and x > self._max):
            return core.set_fault(f"value {x:g} outside the plausible range {self._range_text()}", ts, values)
        if self._max_step is not None and self._accepted is not None:
            step = self._step(self._accepted, x)
            allowed = self._max_step
            dt_ms = ts - self._accepted_ts  # type: ignore[operator]
            if self._max_step_per_ms is not None and dt_ms > self._max_step_per_ms:
                allowed *= dt_ms / self._max_step_per_ms
            if abs(step) > allowed:
                return core.set_fault(
                    f"implausible step {step:+g} in {dt_ms / 1000:g} s (allowed ±{allowed:g})", ts, values
                )
        self._accepted_ts = ts
        self._accepted = x
        self.last_values = values
        out = core.clear_fault(ts, values) if core.fault_reason is not None else []
        self._record(ts, x)
        if self._gate is not None:
            self._in_window = self._gate.contains(ts)
            if not self._in_window:
                out += core.force_clear(ts, values, "outside its time window")
                return out
        cond = self._condition()
        if cond is not None:
            out += core.observe(cond, ts, values, self._describe)
        return out

    def tick(self, now_ms: int) -> list[Transition]:
        """Advance time without a reading: close the time window, flag a stale input, run out delays."""
        if self._t0 is None:
            self._t0 = now_ms
        core = self.core
        values = self.last_values
        out: list[Transition] = []
        if self._gate is not None:
            self._in_window = self._gate.contains(now_ms)
            if not self._in_window:
                out += core.force_clear(now_ms, values, "outside its time window")
        if self._stale_ms is not None and core.fault_reason is None:
            ref = self._last_seen if self._last_seen is not None else self._t0
            if now_ms - ref > self._stale_ms:
                interval = self.config.fault.interval_s
                out += core.set_fault(
                    f"stale: no reading for {(now_ms - ref) / 1000:g} s (expected every {interval:g} s)",
                    now_ms,
                    values,
                )
        if core.fault_reason is None and self._in_window:
            out += core.settle(now_ms, values, self._describe)
        return out

    def acknowledge(self, by: str, now_ms: int) -> list[Transition]:
        """Acknowledge the alarm (see AlarmCore.acknowledge)."""
        return self.core.acknowledge(by, now_ms, self.last_values)

    def state(self) -> AlarmState:
        """The alarm's current state."""
        core = self.core
        return AlarmState(
            rule=self.id,
            level=core.level,
            condition=core.active,
            latched=core.latched,
            acked=core.acked,
            fault=core.fault_reason is not None,
            fault_reason=core.fault_reason,
            since_ms=core.since_ms,
            fault_since_ms=core.fault_since_ms,
            in_window=self._in_window,
        )

    def export(self) -> dict[str, Any]:
        return self.core.export()

    # -- hooks for kinds ------------------------------------------------------------------------------

    def _step(self, previous: float, value: float) -> float:
        """The change the plausibility check limits (accumulation measures the counter increment)."""
        return value - previous

    def _record(self, ts_ms: int, value: float) -> None:
        raise NotImplementedError

    def _condition(self) -> int | None:
        """The level the latest input supports (hysteresis relative to `self.core.active`), or None when
        there is not enough data to say."""
        raise NotImplementedError

    def _describe(self, level: Level) -> str:
        raise NotImplementedError

    def _evaluate_out_of_range(self, ts: int, value: Value, values: Mapping[int, Value]) -> list[Transition]:
        raise NotImplementedError

    def _range_text(self) -> str:
        lo = "-∞" if self._min is None else f"{self._min:g}"
        hi = "+∞" if self._max is None else f"{self._max:g}"
        return f"[{lo}, {hi}]"
