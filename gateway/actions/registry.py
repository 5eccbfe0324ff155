"""Action kinds, found by scanning this package, and the parser for a list of action tables.

A kind is one module that declares `KIND` (the name users write as `kind = "…"`), a frozen `Config`
dataclass with `from_dict(raw, path)`, a `SAMPLE` TOML snippet and one class whose name ends in `Action`.
Importing a module registers nothing; `kinds()` scans the package once into a read-only mapping.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from fnmatch import fnmatchcase
from functools import cache
from typing import Any

from gateway.plugins import Kind, parse_kind_table, scan_kinds
from .base import Context
from .common import MAX_RTU_UNIT, ActionConfig, BusOutputConfig, OutputConfig
from .errors import ActionConfigError


@cache
def kinds() -> Mapping[str, Kind]:
    """Every action kind in this package, by name."""
    return scan_kinds(__package__, "Action")


def is_output(kind: Kind) -> bool:
    """True for a state output (coil, register, gpio); False for an event action (program)."""
    return issubclass(kind.config, OutputConfig)


def kind_of(config: ActionConfig) -> Kind:
    """The kind a typed config belongs to."""
    for kind in kinds().values():
        if type(config) is kind.config:
            return kind
    raise ActionConfigError(config.where(), f"{type(config).__name__} is not the Config of a known action kind")


def build_action(config: ActionConfig, ctx: Context) -> Any:
    """The action object for `config`. Does no I/O; raises ActionConfigError when `ctx` lacks what the
    action needs (e.g. no writer for its bus)."""
    return kind_of(config).cls(config, ctx)


def parse_action(raw: Mapping[str, Any], path: str) -> ActionConfig:
    """One action table → its kind's typed Config. Errors name the field, e.g. `actions[2].when.level`."""
    return parse_kind_table(raw, path, kinds(), "action", ActionConfigError)


def parse_actions(
    raw: Sequence[Mapping[str, Any]],
    path: str = "actions",
    *,
    buses: Mapping[str, str],
    rule_ids: Collection[str],
) -> tuple[ActionConfig, ...]:
    """A list of action tables (the `[[actions]]` array of a site's TOML) → typed Configs, cross-checked
    against the site: `buses` maps each bus name to its type ("rtu" or "tcp"), `rule_ids` are the
    configured alarm rules. Names are unique; every `when.rules` pattern matches some rule; a Modbus output
    names a known bus and a unit that bus can address; no two outputs drive the same coil, register or pin.
    Raises ActionConfigError naming the field."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ActionConfigError(path, f"expected a list of action tables, got {type(raw).__name__}")
    configs = tuple(parse_action(item, f"{path}[{i}]") for i, item in enumerate(raw))
    check_actions(configs, buses=buses, rule_ids=rule_ids)
    return configs


def check_actions(configs: Sequence[ActionConfig], *, buses: Mapping[str, str], rule_ids: Collection[str]) -> None:
    """The checks across actions and against the site (see parse_actions); raises ActionConfigError."""
    ids = sorted(rule_ids)
    names: dict[str, ActionConfig] = {}
    targets: dict[tuple[Any, ...], ActionConfig] = {}
    for c in configs:
        if c.name in names:
            raise ActionConfigError(c.where("name"), f"duplicate action name {c.name!r} (also {names[c.name].where()})")
        names[c.name] = c
        for j, pattern in enumerate(c.when.rules):
            if not any(_one(pattern, r) for r in ids):
                shown = ", ".join(ids[:20]) + (", …" if len(ids) > 20 else "")
                raise ActionConfigError(c.where(f"when.rules[{j}]"), f"no rule id matches {pattern!r}; rule ids: {shown or '(no rules configured)'}")
        if isinstance(c, BusOutputConfig):
            _check_bus(c, buses)
        if isinstance(c, OutputConfig):
            target = c.target()
            if target in targets:
                other = targets[target]
                raise ActionConfigError(c.where(), f"{c.name!r} drives the same {target[0]} as {other.name!r} ({other.where()}); "
                                        "two actions would fight over it: widen one action's when.rules instead")
            targets[target] = c


def _one(pattern: str, rule_id: str) -> bool:
    return rule_id == pattern or fnmatchcase(rule_id, pattern)


def _check_bus(c: BusOutputConfig, buses: Mapping[str, str]) -> None:
    bus_type = buses.get(c.bus)
    if bus_type is None:
        known = ", ".join(sorted(buses)) or "(none)"
        raise ActionConfigError(c.where("bus"), f"unknown bus {c.bus!r}; known buses: {known}")
    if bus_type not in ("rtu", "tcp"):
        raise ActionConfigError(c.where("bus"), f"bus {c.bus!r} is of type {bus_type!r}: coil and register outputs are written "
                                                "over Modbus, on a bus of type \"rtu\" or \"tcp\"")
    if bus_type == "rtu" and not 1 <= c.unit <= MAX_RTU_UNIT:
        raise ActionConfigError(c.where("unit"), f"must be in 1..{MAX_RTU_UNIT} on serial bus {c.bus!r} (0 is broadcast: no answer), got {c.unit}")
