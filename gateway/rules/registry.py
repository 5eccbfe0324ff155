"""Rule kinds, found by scanning this package, and the parser for a list of rule tables.

A kind is one module that declares `KIND` (the name users write as `kind = "…"`), a frozen `Config`
dataclass with `from_dict(raw, path)`, a `SAMPLE` TOML snippet and one class whose name ends in `Rule`.
Importing a module registers nothing; `kinds()` scans the package once into a read-only mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from ..plugins import Kind, parse_kind_table, scan_kinds
from .common import CommonConfig
from .errors import RuleConfigError


@cache
def kinds() -> Mapping[str, Kind]:
    """Every rule kind in this package, by name."""
    return scan_kinds(__package__, "Rule")


def kind_of(config: CommonConfig) -> Kind:
    """The kind a typed config belongs to."""
    for kind in kinds().values():
        if type(config) is kind.config:
            return kind
    raise RuleConfigError(config.where(), f"{type(config).__name__} is not the Config of a known rule kind")


def parse_rule(raw: Mapping[str, Any], path: str) -> CommonConfig:
    """One rule table → its kind's typed Config. Errors name the field, e.g. `rules[3].levels[1].clear`."""
    return parse_kind_table(raw, path, kinds(), "rule", RuleConfigError)


def parse_rules(raw: Sequence[Mapping[str, Any]], path: str = "rules") -> tuple[CommonConfig, ...]:
    """A list of rule tables (the `[[rules]]` array of a site's TOML) → typed Configs, cross-checked:
    ids are unique, combinations name existing rules, and no combination depends on itself."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise RuleConfigError(path, f"expected a list of rule tables, got {type(raw).__name__}")
    configs = tuple(parse_rule(item, f"{path}[{i}]") for i, item in enumerate(raw))
    order_rules(configs)
    return configs


def order_rules(configs: Sequence[CommonConfig]) -> list[CommonConfig]:
    """Check ids and references; return the configs in evaluation order (each after the rules it reads)."""
    by_id: dict[str, CommonConfig] = {}
    for c in configs:
        if c.id in by_id:
            raise RuleConfigError(c.where("id"), f"duplicate rule id {c.id!r} (also {by_id[c.id].where()})")
        by_id[c.id] = c
    for c in configs:
        deps = _depends(c)
        for i, dep in enumerate(deps):
            key = f"rules[{i}]" if i < len(getattr(c, "rules", ())) else "raise_rule"
            if dep not in by_id:
                raise RuleConfigError(c.where(key), f"no rule with id {dep!r}")
            if dep == c.id:
                raise RuleConfigError(c.where(key), "a rule cannot depend on itself")
    ordered: list[CommonConfig] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(c: CommonConfig, chain: list[str]) -> None:
        mark = state.get(c.id)
        if mark == 2:
            return
        if mark == 1:
            cycle = " → ".join([*chain[chain.index(c.id):], c.id])
            raise RuleConfigError(c.where(), f"combination rules depend on each other in a cycle: {cycle}")
        state[c.id] = 1
        for dep in _depends(c):
            visit(by_id[dep], [*chain, c.id])
        state[c.id] = 2
        ordered.append(c)

    for c in configs:
        visit(c, [])
    return ordered


def _depends(config: CommonConfig) -> tuple[str, ...]:
    return getattr(config, "depends", ())
