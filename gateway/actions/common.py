"""Options every action shares (name, `when`, description) and the shared keys of Modbus outputs.

    when = { rules = ["gas.*", "res.zu"], level = "II_ORANGE" }

`rules` are rule ids or fnmatch globs (`*`, `?`, `[…]`; matched case-sensitively against rule ids).
For an output, `level` is the minimum level: the output is ON while any matching rule *shows* that level
or higher (a latched level counts until it is acknowledged away), OFF otherwise. For a program, `level`
is optional and keeps only transitions that touch it (old or new level ≥ `level`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from gateway.rules.levels import Level

from ._parse import Table

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as rule ids: safe in MQTT topics and logs

# Modbus limits: coil/register addresses are 16 bit; units 1..247 on a serial line (0 is broadcast and
# gets no answer), 0..255 over TCP.
MAX_ADDRESS = 0xFFFF
MAX_UNIT = 255
MAX_RTU_UNIT = 247


@dataclass(frozen=True)
class When:
    """Which alarms an action follows: rule ids or globs, and a minimum level (None: any level)."""

    rules: tuple[str, ...]
    level: Level | None = None

    def matches(self, rule_id: str) -> bool:
        """Whether `rule_id` is one of `rules` or matches one of its globs. The gateway's own signals
        (`gateway.fault`) match only by their exact name: a `*` must never turn a fault lamp into a siren."""
        if rule_id.startswith("gateway."):
            return rule_id in self.rules
        return any(rule_id == p or fnmatchcase(rule_id, p) for p in self.rules)


@dataclass(frozen=True, kw_only=True)
class ActionConfig:
    """Options of every action."""

    kind: ClassVar[str]
    name: str
    when: When
    description: str = ""
    path: str = field(default="", compare=False, repr=False)  # where it was read from, for error messages

    def where(self, key: str = "") -> str:
        """The config path of `key` in this action (e.g. `actions[2].bus`), for error messages."""
        base = self.path or f"action {self.name!r}"
        return f"{base}.{key}" if key else base


@dataclass(frozen=True, kw_only=True)
class OutputConfig(ActionConfig):
    """An output whose state follows the alarm levels (a coil, a register, a pin). `when.level` is set."""

    def target(self) -> tuple[Any, ...]:
        """What this output drives, for detecting two actions fighting over one relay, e.g. ("coil", bus,
        unit, address)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class BusOutputConfig(OutputConfig):
    """An output written over a Modbus bus the gateway polls (through that bus's scheduler)."""

    bus: str
    unit: int
    address: int

    def target(self) -> tuple[Any, ...]:
        """(kind, bus, unit, address): two actions may not drive the same one."""
        return (self.kind, self.bus, self.unit, self.address)


def parse_common(t: Table, kind: str, *, output: bool) -> dict[str, Any]:
    """The shared keys of an action table as keyword arguments for a Config of `kind`. An output needs
    `when.level`; for a program it is optional."""
    if t.string("kind") != kind:
        raise t.error("kind", f"expected {kind!r} for this Config, got {t.raw['kind']!r}")
    name = t.string("name")
    if not _NAME.match(name):
        raise t.error("name", f"{name!r} must be 1–64 letters, digits, _ . or -, starting with a letter or digit")
    w = t.table("when")
    rules = w.strings("rules", non_empty=True)
    level = w.level("level") if output else w.level("level", None)
    w.finish()
    return {
        "name": name,
        "when": When(rules, level),
        "description": t.string("description", ""),
        "path": t.path,
    }


def parse_bus_output(t: Table, kind: str) -> dict[str, Any]:
    """parse_common plus `bus`, `unit` and `address` (the bus's type is checked by parse_actions)."""
    args = parse_common(t, kind, output=True)
    args["bus"] = t.string("bus")
    args["unit"] = t.integer("unit", minimum=0, maximum=MAX_UNIT)
    args["address"] = t.integer("address", minimum=0, maximum=MAX_ADDRESS)
    return args
