"""Combination rule: a level derived from other rules' levels.

- `mode = "any" | "all" | "at_least"` (with `count`) over `rules`, each counted when its level ≥ `min_level`;
- while that holds, the result is `result_level`, or one level above the level of `raise_rule`
  (capped at I red; nothing to raise while that rule is at NONE).

Examples: ≥ 2 gas detectors of a zone at II orange → I red; 24 h rain ≥ 50 mm and soil moisture ≥ 40 %
→ raise the rain rule's level by one.

A member counts with the level it shows: a latched member counts until acknowledged, and a member in
fault counts with the level it kept. The combination itself has no input of its own, hence no fault, and
its delays are by time only (it is re-evaluated when a member changes and on every tick).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..model import Reading, Value
from ._parse import Table
from .common import CommonConfig, WindowGate, parse_common
from .core import AlarmCore
from .levels import AlarmState, Level, Transition

KIND = "combination"

SAMPLE = """\
[[rules]]
kind = "threshold"
id = "chem.zone1.gas1"
point = "ai.ch0"
levels = [ { level = "III_YELLOW", set = 25.0, clear = 23.0 }, { level = "II_ORANGE", set = 50.0, clear = 48.0 } ]
latch = true

[[rules]]
kind = "threshold"
id = "chem.zone1.gas2"
point = "ai.ch1"
levels = [ { level = "III_YELLOW", set = 25.0, clear = 23.0 }, { level = "II_ORANGE", set = 50.0, clear = 48.0 } ]
latch = true

[[rules]]
kind = "combination"
id = "chem.zone1.vote"
description = "Two detectors of zone 1 at 二级 → red"
mode = "at_least"                   # "any", "all" or "at_least"
count = 2                           # only with mode = "at_least"
rules = ["chem.zone1.gas1", "chem.zone1.gas2"]
min_level = "II_ORANGE"             # a member counts when its level is at least this
result_level = "I_RED"              # the level while the combination holds …
# raise_rule = "slope.rain"         # … or instead: one level above this rule's level while it holds
# on_delay_s = 0.0                  # delays are by time only on a combination
# off_delay_s = 0.0
latch = true
# window = { start = "06-01", end = "10-31", utc_offset = "+08:00" }
"""


@dataclass(frozen=True, kw_only=True)
class Config(CommonConfig):
    kind: ClassVar[str] = KIND
    mode: str
    count: int = 1
    rules: tuple[str, ...]
    min_level: Level
    result_level: Level | None = None
    raise_rule: str | None = None

    @property
    def depends(self) -> tuple[str, ...]:
        """Every rule this one reads: its members, then raise_rule if that is not a member."""
        extra = () if self.raise_rule is None or self.raise_rule in self.rules else (self.raise_rule,)
        return self.rules + extra

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one rule table; raises RuleConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_common(t, KIND, counts=False)
        mode = t.string("mode", choices=("any", "all", "at_least"))
        rules = t.strings("rules")
        if not rules:
            raise t.error("rules", "needs at least one rule id")
        for i, rule in enumerate(rules):
            if rule in rules[:i]:
                raise t.error(f"rules[{i}]", f"{rule!r} is listed twice")
        if mode == "at_least":
            count = t.integer("count", minimum=1)
            if count > len(rules):
                raise t.error("count", f"{count} is more than the {len(rules)} rules listed")
        else:
            if t.has("count"):
                raise t.error("count", f"only used with mode = \"at_least\" (mode is {mode!r})")
            count = 1 if mode == "any" else len(rules)
        min_level = t.level("min_level")
        result_level = t.level("result_level", None)
        raise_rule = t.string("raise_rule", None)
        if (result_level is None) == (raise_rule is None):
            raise t.error("result_level", "set exactly one of result_level and raise_rule")
        t.finish()
        return cls(
            **args, mode=mode, count=count, rules=rules, min_level=min_level,
            result_level=result_level, raise_rule=raise_rule,
        )


class Member(Protocol):
    id: str

    @property
    def level(self) -> Level: ...

    @property
    def last_values(self) -> Mapping[int, Value]: ...


class CombinationRule:
    """Derives a level from other rules' levels; the engine calls `update` when a member changes."""

    def __init__(self, config: Config, members: Sequence[Member], raise_rule: Member | None = None) -> None:
        self.config = config
        self.id = config.id
        self.points: tuple[int, ...] = ()
        self.depends = config.depends
        self._members = tuple(members)
        self._raise = raise_rule
        self._min = config.min_level
        self._count = config.count
        self._result = config.result_level
        self.core = AlarmCore(
            config.id, latch=config.latch, on_delay_s=config.on_delay_s, off_delay_s=config.off_delay_s
        )
        self._gate = WindowGate(config.window) if config.window is not None else None
        self._in_window = True
        self._held = 0

    @property
    def level(self) -> Level:
        """The level the alarm shows."""
        return self.core.level

    @property
    def last_values(self) -> Mapping[int, Value]:
        """The members' latest values, point index → value (the "triggering values" of a transition)."""
        merged: dict[int, Value] = {}
        for m in self._members:
            merged.update(m.last_values)
        if self._raise is not None:
            merged.update(self._raise.last_values)
        return merged

    def update(self, now_ms: int) -> list[Transition]:
        """Re-read the members' levels at `now_ms` and return the transitions that causes."""
        core = self.core
        if self._gate is not None:
            self._in_window = self._gate.contains(now_ms)
            if not self._in_window:
                return core.force_clear(now_ms, self.last_values, "outside its time window")
        held = 0
        for m in self._members:
            if m.level >= self._min:
                held += 1
        self._held = held
        cond = 0
        if held >= self._count:
            if self._result is not None:
                cond = self._result
            elif self._raise is not None and self._raise.level > 0:
                cond = min(self._raise.level + 1, 4)
        return core.observe(cond, now_ms, self.last_values, self._describe)

    def evaluate(self, reading: Reading) -> list[Transition]:
        """A combination reads no point: always []. Its members' changes reach it through `update`."""
        return []

    def tick(self, now_ms: int) -> list[Transition]:
        """Advance time: the window and time-based delays (members are re-read as well)."""
        return self.update(now_ms)

    def acknowledge(self, by: str, now_ms: int) -> list[Transition]:
        """Acknowledge the alarm (see AlarmCore.acknowledge)."""
        return self.core.acknowledge(by, now_ms, self.last_values)

    def move_times(self, move: Callable[[int], int]) -> None:
        """The wall clock stepped (see PointRule.move_times)."""
        self.core.move_times(move)

    def state(self) -> AlarmState:
        """The alarm's current state (a combination never has a fault of its own)."""
        core = self.core
        return AlarmState(
            rule=self.id, level=core.level, condition=core.active, latched=core.latched, acked=core.acked,
            fault=False, fault_reason=None, since_ms=core.since_ms, fault_since_ms=None, in_window=self._in_window,
        )

    def export(self) -> dict[str, Any]:
        """The JSON-able state that must survive a restart."""
        return self.core.export()

    def _describe(self, level: Level) -> str:
        c = self.config
        members = ", ".join(f"{m.id}={m.level.name}" for m in self._members)
        need = {"any": "any", "all": "all", "at_least": f"at least {c.count}"}[c.mode]
        text = f"{self._held} of {len(self._members)} at ≥ {c.min_level.name} (need {need}): {members}"
        if self._raise is not None:
            text += f"; raising {self._raise.id} ({self._raise.level.name}) one level"
        if level == Level.NONE:
            text = "no longer holds; " + text
        return text

