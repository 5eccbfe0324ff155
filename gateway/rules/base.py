"""What every rule on one catalogue point does before its kind's arithmetic: drop duplicate and
out-of-order readings, turn bad quality, non-numbers, implausible values, silence and a device's own
status flags into a fault, and honour the rule's time window. A kind subclasses `PointRule` and
implements `_record`, `_condition` and `_describe`.

Fault sources are tracked separately ("input" for the rule's own point, plus one per status point); the
rule is in fault while any source is, and `fault_cleared` comes when the last one clears.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from ..model import Quality, Reading, Value, quality_name
from .common import PointConfig, WindowGate
from .core import AlarmCore
from .errors import RuleConfigError, RuleStateError
from .levels import AlarmState, Level, Transition

_EMPTY: Mapping[int, Value] = {}
OWN_INPUT = -1  # fault-source key of the rule's own point (status points use their index)


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


def thin_series(ts: list[int], values: list[float], limit: int) -> tuple[list[int], list[float]]:
    """At most `limit` points of a time series, evenly spread over its span; the first and the last kept.

    Window lookups take the newest saved point at or before a window's start, so a thinned history can
    only make that point older: a rise over a window reads as large or larger, never smaller.
    """
    n = len(ts)
    if n <= limit:
        return list(ts), list(values)
    step = (n - 1) / (limit - 1)
    picks = sorted({round(i * step) for i in range(limit)})
    return [ts[i] for i in picks], [values[i] for i in picks]


def restore_series(data: Mapping[str, Any], where: str, limit: int) -> tuple[list[int], list[float]]:
    """The `ts` and `v` lists of a saved history, checked (RuleStateError naming the key)."""
    ts, values = data.get("ts"), data.get("v")
    if not (isinstance(ts, list) and isinstance(values, list) and len(ts) == len(values) <= limit):
        raise RuleStateError(f"{where}.ts", f"expected lists ts and v of equal length, at most {limit}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ts) or any(b < a for a, b in zip(ts, ts[1:])):
        raise RuleStateError(f"{where}.ts", "expected epoch ms in time order")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise RuleStateError(f"{where}.v", "expected finite numbers")
    return list(ts), [float(v) for v in values]


def resolve_point(resolve: Callable[[str], int], name: str, where: str) -> int:
    """`resolve(name)` as a checked catalogue index; RuleConfigError naming `where` if it is unknown."""
    try:
        index = resolve(name)
    except LookupError as e:
        raise RuleConfigError(where, f"unknown point {name!r}") from e
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise RuleConfigError(where, f"the point resolver gave {index!r} for {name!r}, not a catalogue index")
    return index


class PointRule:
    """Base of the rules that watch one point. Synchronous and pure; time comes from the caller."""

    # set by a kind that may evaluate OUT_OF_RANGE readings that raise (see threshold.Config.out_of_range)
    _raise_only_out_of_range = False
    # set by a kind whose condition depends on a history of readings (rate, accumulation): that history is
    # saved with the alarm state, so a restart neither clears nor re-raises a level by itself
    has_window = False
    MAX_SAVED_POINTS = 256

    def __init__(self, config: PointConfig, resolve: Callable[[str], int]) -> None:
        self.config = config
        self.id = config.id
        fault = config.fault
        self.point = resolve_point(resolve, config.point, config.where("point"))
        # status point index → True for a `flags` point (fault while true), False for `valid`
        self._status: dict[int, bool] = {}
        for key, is_flag in (("flags", True), ("valid", False)):
            for i, name in enumerate(getattr(fault, key)):
                index = resolve_point(resolve, name, config.where(f"fault.{key}[{i}]"))
                if index == self.point or index in self._status:
                    raise RuleConfigError(config.where(f"fault.{key}[{i}]"), f"{name!r} is already an input of this rule")
                self._status[index] = is_flag
        self._status_names = {idx: name for idx, name in zip(self._status, (*fault.flags, *fault.valid))}
        self.points: tuple[int, ...] = (self.point, *self._status)
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
        self._stale_ms = fault.stale_after_ms
        self._max_step = fault.max_step
        self._max_step_per_ms = fault.max_step_per_s * 1000 if fault.max_step_per_s else None
        self._min = fault.min
        self._max = fault.max
        self._faults: dict[int, str] = {}  # fault source → reason
        self._t0: int | None = None  # first time this rule saw (for staleness of a point never read)
        self._last_seen: int | None = None  # latest reading of the rule's point, any quality
        self._status_seen: dict[int, int] = {}
        self._accepted_ts: int | None = None
        self._accepted: float | None = None
        self.last_values: Mapping[int, Value] = _EMPTY

    # -- the Rule interface ---------------------------------------------------------------------------

    @property
    def level(self) -> Level:
        """The level the alarm shows."""
        return self.core.level

    def evaluate(self, reading: Reading) -> list[Transition]:
        """Evaluate one reading of this rule's point (or of one of its status points) and return the
        transitions it causes.

        A reading no newer than the last one of its point is ignored. A bad one (quality, not a number,
        out of the plausible range, an implausible step) raises a fault and keeps the level; the next
        good one clears it. While a status point reports a fault, readings of the value are not used.
        """
        if reading.point != self.point:
            return self._evaluate_status(reading)
        ts = reading.ts_ms
        if self._last_seen is not None and ts <= self._last_seen:
            return []
        self._last_seen = ts
        if self._t0 is None:
            self._t0 = ts
        values = {self.point: reading.value}
        quality = reading.quality
        if quality != Quality.GOOD:
            if quality == Quality.OUT_OF_RANGE and self._raise_only_out_of_range and not self._status_faulted():
                return self._evaluate_out_of_range(ts, reading.value, values)
            return self._fault_on(OWN_INPUT, f"bad quality: {quality_name(quality)}", ts, values)
        x = as_number(reading.value)
        if x is None:
            return self._fault_on(OWN_INPUT, f"value {reading.value!r} is not a finite number", ts, values)
        if (self._min is not None and x < self._min) or (self._max is not None and x > self._max):
            return self._fault_on(OWN_INPUT, f"value {x:g} outside the plausible range {self._range_text()}", ts, values)
        if self._max_step is not None and self._accepted is not None:
            step = self._step(self._accepted, x)
            allowed = self._max_step
            dt_ms = ts - self._accepted_ts  # type: ignore[operator]
            if self._max_step_per_ms is not None and dt_ms > self._max_step_per_ms:
                allowed *= dt_ms / self._max_step_per_ms
            if abs(step) > allowed:
                reason = f"implausible step {step:+g} in {dt_ms / 1000:g} s (allowed ±{allowed:g})"
                return self._fault_on(OWN_INPUT, reason, ts, values)
        out = self._fault_off(OWN_INPUT, ts, values) if self._faults else []
        if self._faults:
            return out  # a status point still says the value cannot be trusted
        self._accepted_ts = ts
        self._accepted = x
        self.last_values = values
        self._record(ts, x)
        core = self.core
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
        if self._stale_ms is not None and OWN_INPUT not in self._faults:
            ref = self._last_seen if self._last_seen is not None else self._t0
            if now_ms - ref > self._stale_ms:
                interval = self.config.fault.interval_s
                reason = f"stale: no reading for {(now_ms - ref) / 1000:g} s (expected every {interval:g} s)"
                out += self._fault_on(OWN_INPUT, reason, now_ms, values)
        if not self._faults and self._in_window:
            out += core.settle(now_ms, values, self._describe)
        return out

    def acknowledge(self, by: str, now_ms: int) -> list[Transition]:
        """Acknowledge the alarm (see AlarmCore.acknowledge)."""
        return self.core.acknowledge(by, now_ms, self.last_values)

    def move_times(self, move: Callable[[int], int]) -> None:
        """The wall clock stepped: move every remembered reading time with it (AlarmEngine.shift_time). Without
        this, a step back would make the next readings look no newer than the last one (ignored until the
        clock caught up: an alarm missed for the length of the step), and a step forward would look like a
        stale input and run out every delay at once."""
        self.core.move_times(move)
        if self._t0 is not None:
            self._t0 = move(self._t0)
        if self._last_seen is not None:
            self._last_seen = move(self._last_seen)
        if self._accepted_ts is not None:
            self._accepted_ts = move(self._accepted_ts)
        self._status_seen = {index: move(ts) for index, ts in self._status_seen.items()}
        self._move_window(move)

    def _move_window(self, move: Callable[[int], int]) -> None:
        """Move a kind's own history of reading times (rate, accumulation) with a clock step."""

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
        """The JSON-able state that must survive a restart."""
        entry = self.core.export()
        if self.has_window:
            window = self._export_window()
            if window:
                entry["window"] = window
        return entry

    def _export_window(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def restore_window(self, data: Mapping[str, Any], where: str) -> None:
        """Take the saved history back (validated: raises RuleStateError naming the bad key)."""
        raise NotImplementedError

    # -- faults ---------------------------------------------------------------------------------------

    def _fault_on(self, source: int, reason: str, ts: int, values: Mapping[int, Value]) -> list[Transition]:
        self._faults.setdefault(source, reason)
        return self.core.set_fault(reason, ts, values)  # reports only the first source; forgets delays

    def _fault_off(self, source: int, ts: int, values: Mapping[int, Value]) -> list[Transition]:
        if self._faults.pop(source, None) is None or self._faults:
            return []
        return self.core.clear_fault(ts, values)

    def _status_faulted(self) -> bool:
        return any(source != OWN_INPUT for source in self._faults)

    def _evaluate_status(self, reading: Reading) -> list[Transition]:
        index = reading.point
        ts = reading.ts_ms
        last = self._status_seen.get(index)
        if last is not None and ts <= last:
            return []
        self._status_seen[index] = ts
        values = {index: reading.value}
        name = self._status_names[index]
        if reading.quality != Quality.GOOD:
            return self._fault_on(index, f"status point {name}: bad quality: {quality_name(reading.quality)}", ts, values)
        value = reading.value
        if value is None:
            return self._fault_on(index, f"status point {name} has no value", ts, values)
        if self._status[index]:
            if value:
                return self._fault_on(index, f"device reports {name}", ts, values)
        elif not value:
            return self._fault_on(index, f"device reports {name} false", ts, values)
        return self._fault_off(index, ts, values)

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
