"""Warning levels, transitions and alarm state: the values the rule engine hands to the rest of the gateway.

Levels follow China's four-level warning colours (docs/domain.md §3): I red is the highest, IV blue the
lowest. A gateway level is a *site alarm*, not an official public warning. A sensor fault is not a level: it
is a separate flag on a rule, and never reads as NONE.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..model import Value


class Level(enum.IntEnum):
    """Site alarm level. Ordered, so `level >= Level.III_YELLOW` reads as "yellow or worse"."""

    NONE = 0
    IV_BLUE = 1
    III_YELLOW = 2
    II_ORANGE = 3
    I_RED = 4

    @property
    def colour(self) -> str:
        """The warning colour ("none", "blue", "yellow", "orange", "red")."""
        return _COLOURS[self]

    @classmethod
    def parse(cls, text: str) -> Level:
        """The level named by `text`: an enum name (`III_YELLOW`) or a colour (`yellow`), any case.

        Raises ValueError listing the accepted names.
        """
        key = text.strip().upper()
        if key in cls.__members__:
            return cls[key]
        for level, colour in _COLOURS.items():
            if key == colour.upper():
                return level
        names = ", ".join(m.name for m in cls)
        raise ValueError(f"unknown level {text!r}; use one of {names} or a colour (blue, yellow, orange, red)")


_COLOURS = {
    Level.NONE: "none",
    Level.IV_BLUE: "blue",
    Level.III_YELLOW: "yellow",
    Level.II_ORANGE: "orange",
    Level.I_RED: "red",
}

LEVELS: tuple[Level, ...] = tuple(Level)  # index → Level, cheaper than Level(i) in hot paths


class TransitionKind(enum.StrEnum):
    RAISED = "raised"  # NONE → a level
    ESCALATED = "escalated"  # a level → a higher level
    DE_ESCALATED = "de_escalated"  # a level → a lower level other than NONE
    CLEARED = "cleared"  # a level → NONE
    ACKNOWLEDGED = "acknowledged"  # an operator acknowledged the alarm; the level may follow in a second transition
    FAULT = "fault"  # an input became untrustworthy; the level is kept as it was
    FAULT_CLEARED = "fault_cleared"  # the input is trustworthy again


LEVEL_KINDS = frozenset(
    {TransitionKind.RAISED, TransitionKind.ESCALATED, TransitionKind.DE_ESCALATED, TransitionKind.CLEARED}
)


def level_change_kind(old: Level, new: Level) -> TransitionKind:
    """The kind of a change from `old` to `new` (which must differ)."""
    if old == Level.NONE:
        return TransitionKind.RAISED
    if new == Level.NONE:
        return TransitionKind.CLEARED
    return TransitionKind.ESCALATED if new > old else TransitionKind.DE_ESCALATED


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of one alarm. Emitted in the order the changes happened.

    For `fault`, `fault_cleared` and `acknowledged`, old_level == new_level (the level at that moment).
    `values` maps point index → the reading value(s) that triggered it; treat it as read-only.
    """

    kind: TransitionKind
    rule: str
    old_level: Level
    new_level: Level
    ts_ms: int
    values: Mapping[int, Value]
    message: str
    by: str | None = None  # who acknowledged (acknowledged, and a level change an acknowledgement released)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (str keys, ints for levels) for logging or encoding; values are passed through."""
        return {
            "kind": str(self.kind),
            "rule": self.rule,
            "old_level": int(self.old_level),
            "new_level": int(self.new_level),
            "ts_ms": self.ts_ms,
            "values": dict(self.values),
            "message": self.message,
            "by": self.by,
        }


@dataclass(frozen=True, slots=True)
class AlarmState:
    """The current state of one alarm, for a retained status message or a local panel."""

    rule: str
    level: Level  # what the alarm shows (held at its highest by a latch until acknowledged)
    condition: Level  # what the condition supports now, after on/off delays
    latched: bool  # level is held above the condition, waiting for an acknowledgement
    acked: bool  # the current level has been acknowledged
    fault: bool
    fault_reason: str | None
    since_ms: int | None  # when `level` was entered (None: never left NONE)
    fault_since_ms: int | None
    in_window: bool  # the rule's time window (if any) contains the latest time the rule has seen

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict (levels as ints plus a colour)."""
        return {
            "rule": self.rule,
            "level": int(self.level),
            "colour": self.level.colour,
            "condition": int(self.condition),
            "latched": self.latched,
            "acked": self.acked,
            "fault": self.fault,
            "fault_reason": self.fault_reason,
            "since_ms": self.since_ms,
            "fault_since_ms": self.fault_since_ms,
            "in_window": self.in_window,
        }
