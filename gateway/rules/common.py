"""Options every rule shares: id, delays, latch, time window; plus the fault checks of a point input.

Kind modules (threshold, rate, accumulation, combination) build their `Config` on top of these.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._parse import Table
from .levels import Level

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as gateway.config.ID_RE: safe in MQTT topics
_MONTH_DAY = re.compile(r"^(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2}))?$")
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_DAY_MS = 86_400_000
_MINUTES_PER_DAY = 1440
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # Feb 29 is a valid boundary


# ---------------------------------------------------------------------------------------------- window


@dataclass(frozen=True)
class WindowConfig:
    """A yearly window in local time, e.g. the flood season 06-01 … 10-31 at UTC+08:00.

    `start` and `end` are (month, day, minute-of-day); `start` is inclusive and `end` exclusive. A window
    whose start is later in the year than its end wraps over New Year (11-01 … 03-31).
    """

    start: tuple[int, int, int]
    end: tuple[int, int, int]
    utc_offset_min: int

    def contains(self, ts_ms: int) -> bool:
        """Whether the epoch-ms instant `ts_ms` falls inside the window (local time per utc_offset_min)."""
        local_ms = ts_ms + self.utc_offset_min * 60_000
        date = _dt.date(1970, 1, 1) + _dt.timedelta(days=local_ms // _DAY_MS)
        return self.contains_local(date.month, date.day, (local_ms % _DAY_MS) // 60_000)

    def contains_local(self, month: int, day: int, minute: int) -> bool:
        """Whether a local date and minute of the day fall inside the window."""
        t = (month, day, minute)
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end


class WindowGate:
    """A window plus a one-day cache of the local date, so a check per reading costs a division."""

    __slots__ = ("config", "_day", "_month_day", "_offset_ms")

    def __init__(self, config: WindowConfig) -> None:
        self.config = config
        self._offset_ms = config.utc_offset_min * 60_000
        self._day: int | None = None
        self._month_day = (0, 0)

    def contains(self, ts_ms: int) -> bool:
        """Same answer as WindowConfig.contains, cheaper for readings that arrive in time order."""
        local_ms = ts_ms + self._offset_ms
        day = local_ms // _DAY_MS
        if day != self._day:
            date = _dt.date(1970, 1, 1) + _dt.timedelta(days=day)
            self._day = day
            self._month_day = (date.month, date.day)
        month, mday = self._month_day
        return self.config.contains_local(month, mday, (local_ms % _DAY_MS) // 60_000)


def _parse_month_day(t: Table, key: str, *, end: bool) -> tuple[int, int, int]:
    text = t.string(key)
    m = _MONTH_DAY.match(text)
    if not m:
        raise t.error(key, f"expected \"MM-DD\" or \"MM-DD HH:MM\" (local time), got {text!r}")
    month, day = int(m.group(1)), int(m.group(2))
    if not 1 <= month <= 12 or not 1 <= day <= _DAYS_IN_MONTH[month]:
        raise t.error(key, f"{text!r} is not a day of the year")
    if m.group(3) is None:
        # a bare end date includes that whole day
        return (month, day, _MINUTES_PER_DAY if end else 0)
    hour, minute = int(m.group(3)), int(m.group(4))
    if hour > 23 or minute > 59:
        raise t.error(key, f"{text!r} has an invalid time of day")
    return (month, day, hour * 60 + minute)


def parse_window(t: Table) -> WindowConfig:
    """A `window = { start, end, utc_offset }` table."""
    start = _parse_month_day(t, "start", end=False)
    end = _parse_month_day(t, "end", end=True)
    offset_text = t.string("utc_offset")
    m = _OFFSET.match(offset_text)
    if not m or int(m.group(2)) > 14 or int(m.group(3)) > 59:
        raise t.error("utc_offset", f"expected \"+HH:MM\" or \"-HH:MM\", got {offset_text!r}")
    offset = (int(m.group(2)) * 60 + int(m.group(3))) * (-1 if m.group(1) == "-" else 1)
    t.finish()
    if start == end:
        raise t.error("end", "the window is empty (start == end)")
    return WindowConfig(start=start, end=end, utc_offset_min=offset)


# ---------------------------------------------------------------------------------------------- faults

OUT_OF_RANGE_MODES = ("fault", "raise_only")


@dataclass(frozen=True)
class FaultConfig:
    """When a rule's input is untrustworthy. A fault freezes the rule at its current level.

    - `interval_s` × `stale_intervals`: no reading for that long → fault `stale` (checked by `tick`).
    - `max_step` (and `max_step_per_s`): a reading further than max_step from the last accepted one
      (allowance scaled up by elapsed/max_step_per_s when that is > 1) is rejected → fault `implausible step`.
    - `min` / `max`: plausible range of the value itself (e.g. a piezometer's 0 … full scale).
    - `flags` / `valid`: status points of the same device. The rule is in fault while any `flags` point
      reads true (e.g. `sensor_lost`) or any `valid` point reads false (e.g. `status_valid`), or while
      such a point's own reading is bad; the rule's value is not trusted meanwhile.
    """

    interval_s: float | None = None
    stale_intervals: int = 3
    max_step: float | None = None
    max_step_per_s: float | None = None
    min: float | None = None
    max: float | None = None
    flags: tuple[str, ...] = ()
    valid: tuple[str, ...] = ()

    @property
    def stale_after_ms(self) -> int | None:
        """How long without a reading makes the input stale, or None when not checked."""
        if self.interval_s is None:
            return None
        return round(self.interval_s * self.stale_intervals * 1000)


def parse_fault(t: Table | None) -> FaultConfig:
    """A `[rules.fault]` table (absent: no fault checks beyond quality and non-numbers)."""
    if t is None:
        return FaultConfig()
    interval_s = t.number("interval_s", None, positive=True)
    stale_intervals = t.integer("stale_intervals", 3, minimum=1)
    max_step = t.number("max_step", None, positive=True)
    max_step_per_s = t.number("max_step_per_s", None, positive=True)
    lo = t.number("min", None)
    hi = t.number("max", None)
    flags = t.strings("flags", ())
    valid = t.strings("valid", ())
    t.finish()
    seen: set[str] = set()
    for key, names in (("flags", flags), ("valid", valid)):
        for i, name in enumerate(names):
            if name in seen:
                raise t.error(f"{key}[{i}]", f"{name!r} is listed twice")
            seen.add(name)
    if max_step_per_s is not None and max_step is None:
        raise t.error("max_step_per_s", "needs max_step")
    if t.has("stale_intervals") and interval_s is None:
        raise t.error("stale_intervals", "needs interval_s (the expected time between readings)")
    if lo is not None and hi is not None and lo >= hi:
        raise t.error("max", f"must be > min ({lo:g}), got {hi:g}")
    return FaultConfig(
        interval_s=interval_s,
        stale_intervals=stale_intervals,
        max_step=max_step,
        max_step_per_s=max_step_per_s,
        min=lo,
        max=hi,
        flags=flags,
        valid=valid,
    )


# ---------------------------------------------------------------------------------------------- common


@dataclass(frozen=True, kw_only=True)
class CommonConfig:
    """Options of every rule. Delays: time (`*_delay_s`) or consecutive readings (`*_delay_count`), not both."""

    id: str
    description: str = ""
    latch: bool = False
    on_delay_s: float = 0.0
    on_delay_count: int = 1
    off_delay_s: float = 0.0
    off_delay_count: int = 1
    window: WindowConfig | None = None
    path: str = field(default="", compare=False, repr=False)  # where it was read from, for error messages

    def where(self, key: str = "") -> str:
        """The config path of `key` in this rule (e.g. `rules[3].point`), for error messages."""
        base = self.path or f"rule {self.id!r}"
        return f"{base}.{key}" if key else base


@dataclass(frozen=True, kw_only=True)
class PointConfig(CommonConfig):
    """A rule on one catalogue point, named as the resolver knows it (e.g. "radar.ZU")."""

    point: str
    fault: FaultConfig = FaultConfig()


def parse_common(t: Table, kind: str, *, counts: bool = True) -> dict[str, Any]:
    """The shared keys of a rule table as keyword arguments for a Config of `kind`."""
    if t.string("kind") != kind:
        raise t.error("kind", f"expected {kind!r} for this Config, got {t.raw['kind']!r}")
    rule_id = t.string("id")
    if not _ID.match(rule_id):
        raise t.error("id", f"{rule_id!r} must be 1–64 letters, digits, _ . or -, starting with a letter or digit")
    if rule_id.startswith("gateway."):
        raise t.error("id", f"{rule_id!r}: ids starting with 'gateway.' are the gateway's own (gateway.fault)")
    args: dict[str, Any] = {
        "id": rule_id,
        "description": t.string("description", ""),
        "latch": t.boolean("latch", False),
        "path": t.path,
    }
    for edge in ("on", "off"):
        key_s, key_n = f"{edge}_delay_s", f"{edge}_delay_count"
        args[key_s] = t.number(key_s, 0.0, non_negative=True)
        if counts:
            args[key_n] = t.integer(key_n, 1, minimum=1)
            if t.has(key_s) and t.has(key_n):
                raise t.error(key_n, f"set {key_s} or {key_n}, not both")
        elif t.has(key_n):
            raise t.error(key_n, "not available on this kind of rule; use " + key_s)
    window = t.table("window", None)
    args["window"] = None if window is None else parse_window(window)
    return args


def parse_point(t: Table, kind: str) -> dict[str, Any]:
    """parse_common plus the keys of a rule on one point (`point`, `fault`)."""
    args = parse_common(t, kind)
    point = t.string("point")
    if not point:
        raise t.error("point", "must not be empty")
    args["point"] = point
    fault = parse_fault(t.table("fault", None))
    for key in ("flags", "valid"):
        names = getattr(fault, key)
        if point in names:
            raise t.error(f"fault.{key}[{names.index(point)}]", f"{point!r} is the rule's own point")
    args["fault"] = fault
    return args


# ---------------------------------------------------------------------------------------------- levels


@dataclass(frozen=True)
class LevelSpec:
    """One rung of a level ladder: enter `level` at `set`, leave it past `clear` (hysteresis).

    High direction: enter when value ≥ set, stay while value ≥ clear (clear ≤ set).
    Low direction: enter when value ≤ set, stay while value ≤ clear (clear ≥ set).
    `window_s` is used by accumulation rules only (the sum over the last window_s seconds).
    """

    level: Level
    set: float
    clear: float
    window_s: float | None = None


def parse_levels(t: Table, key: str, *, high: bool, with_window: bool = False) -> tuple[LevelSpec, ...]:
    """Parse a ladder. Levels ascend; `set` values move away from normal as the level rises (per window)."""
    tables = t.tables(key)
    if not tables:
        raise t.error(key, "needs at least one level")
    specs: list[LevelSpec] = []
    for lt in tables:
        level = lt.level("level")
        set_value = lt.number("set")
        clear = lt.number("clear", set_value)
        window_s = lt.number("window_s", positive=True) if with_window else None
        lt.finish()
        if high and clear > set_value:
            raise lt.error("clear", f"must be ≤ set ({set_value:g}) for a high threshold, got {clear:g}")
        if not high and clear < set_value:
            raise lt.error("clear", f"must be ≥ set ({set_value:g}) for a low threshold, got {clear:g}")
        for j, prev in enumerate(specs):
            if prev.window_s != window_s:
                continue
            what = f"levels[{j}]" + (f" (same window_s {window_s:g})" if with_window else "")
            if level <= prev.level:
                raise lt.error("level", f"{level.name} must be higher than {prev.level.name} of {what}")
            if (high and set_value <= prev.set) or (not high and set_value >= prev.set):
                rel = "above" if high else "below"
                raise lt.error("set", f"{set_value:g} must be {rel} {prev.set:g} of {what}, a lower level")
        specs.append(LevelSpec(level=level, set=set_value, clear=clear, window_s=window_s))
    return tuple(specs)


def ladder(specs: Sequence[LevelSpec], value: float, active: int, high: bool = True) -> int:
    """The level `value` supports, given the currently confirmed level `active` (for hysteresis)."""
    best = 0
    for s in specs:
        lv = s.level
        if lv <= best:
            continue
        if high:
            hit = value >= s.set or (lv <= active and value >= s.clear)
        else:
            hit = value <= s.set or (lv <= active and value <= s.clear)
        if hit:
            best = lv
    return best


def spec_for(specs: Sequence[LevelSpec], level: int) -> LevelSpec | None:
    """The first rung for `level`, or None."""
    for s in specs:
        if s.level == level:
            return s
    return None

