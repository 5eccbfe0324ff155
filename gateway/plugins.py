"""What the rule kinds and the action kinds share: a table reader whose errors name the field, and a
registry built by scanning a package.

A kind is one module that declares `KIND` (what users write as `kind = "…"`), a frozen `Config`
dataclass with `from_dict(raw, path)`, a `SAMPLE` TOML snippet and one class whose name ends in the
package's role (`Rule`, `Action`). Importing a module registers nothing; `scan_kinds()` reads the
package into a read-only mapping.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType, ModuleType
from typing import Any, ClassVar

MISSING: Any = object()


class FieldError(ValueError):
    """A configuration table is invalid. `path` names the field, e.g. `rules[3].levels[1].clear`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class Table:
    """One config table. Every getter records the key it was asked for; `finish()` then rejects any key
    nobody asked for, so a typo is an error instead of a silently ignored option."""

    error_type: ClassVar[type[FieldError]] = FieldError

    def __init__(self, raw: object, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise self.error_type(path, f"expected a table, got {type(raw).__name__}")
        for key in raw:
            if not isinstance(key, str):
                raise self.error_type(path, f"keys must be strings, got {key!r}")
        self.raw: Mapping[str, Any] = raw
        self.path = path
        self._known: list[str] = []

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        if key not in self._known:
            self._known.append(key)
        return key in self.raw

    def _get(self, key: str, default: Any) -> Any:
        self.has(key)
        if key in self.raw:
            return self.raw[key]
        if default is MISSING:
            import difflib

            near = difflib.get_close_matches(key, [k for k in self.raw if isinstance(k, str)], n=1, cutoff=0.6)
            hint = f" (is {near[0]!r} a typo for it?)" if near else ""
            raise self.error_type(self.at(key), f"missing required key{hint}")
        return default

    def error(self, key: str, reason: str) -> FieldError:
        return self.error_type(self.at(key), reason)

    def string(self, key: str, default: Any = MISSING, *, choices: Sequence[str] | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def boolean(self, key: str, default: Any = MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not MISSING:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: Any = MISSING, *, positive: bool = False, non_negative: bool = False) -> Any:
        value = self._get(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            raise self.error(key, f"expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise self.error(key, f"expected a finite number, got {value!r}")
        if positive and number <= 0:
            raise self.error(key, f"must be > 0, got {value!r}")
        if non_negative and number < 0:
            raise self.error(key, f"must be ≥ 0, got {value!r}")
        return number

    def integer(self, key: str, default: Any = MISSING, *, minimum: int | None = None, maximum: int | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if maximum is None and minimum is not None and value < minimum:
            raise self.error(key, f"must be ≥ {minimum}, got {value}")
        if maximum is not None and (value > maximum or (minimum is not None and value < minimum)):
            raise self.error(key, f"must be in {'' if minimum is None else minimum}..{maximum}, got {value}")
        return value

    def level(self, key: str, default: Any = MISSING, *, allow_none: bool = False) -> Any:
        """A level name ("II_ORANGE") or colour ("orange")."""
        from .rules.levels import Level

        value = self._get(key, default)
        if value is default and default is not MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a level name such as \"III_YELLOW\" or \"yellow\", got {value!r}")
        try:
            level = Level.parse(value)
        except ValueError as e:
            raise self.error(key, str(e)) from None
        if level == Level.NONE and not allow_none:
            raise self.error(key, "NONE is not an alarm level here; use IV_BLUE (blue) or higher")
        return level

    def strings(self, key: str, default: Any = MISSING, *, non_empty: bool = False) -> Any:
        value = self._get(key, default)
        if value is default and default is not MISSING:
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        if non_empty and not value:
            raise self.error(key, "must not be empty")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error_type(f"{self.at(key)}[{i}]", f"expected a string, got {item!r}")
            if non_empty and not item:
                raise self.error_type(f"{self.at(key)}[{i}]", "must not be empty")
        return tuple(value)

    def table(self, key: str, default: Any = MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not MISSING:
            return value
        return type(self)(value, self.at(key))

    def tables(self, key: str) -> list[Table]:
        value = self._get(key, MISSING)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.error(key, f"expected a list of tables, got {value!r}")
        return [type(self)(item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]

    def finish(self) -> None:
        """Reject keys that no getter asked for, suggesting the nearest known one."""
        import difflib

        for key in self.raw:
            if key not in self._known:
                near = difflib.get_close_matches(key, self._known, n=1, cutoff=0.6)
                known = ", ".join(sorted(self._known))
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise self.error(key, f"unknown key; {hint}known keys here: {known}")


@dataclass(frozen=True)
class Kind:
    name: str
    module: ModuleType
    config: type
    cls: type  # the *Rule or *Action class
    sample: str


def _load_kind(module: ModuleType, role: str) -> Kind:
    label = role.lower()
    name = module.KIND
    classes = [
        obj for attr, obj in vars(module).items()
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and attr.endswith(role)
    ]
    if len(classes) != 1:
        raise TypeError(f"{label} kind module {module.__name__} must define exactly one *{role} class, found {len(classes)}")
    config = getattr(module, "Config", None)
    sample = getattr(module, "SAMPLE", None)
    if config is None or not isinstance(sample, str):
        raise TypeError(f"{label} kind module {module.__name__} must define Config and SAMPLE")
    return Kind(name, module, config, classes[0], sample)


def scan_kinds(package: str, role: str, *, lazy: bool = False) -> Mapping[str, Kind]:
    """Every kind module in `package` (modules starting with "_" and modules without KIND are skipped).

    `lazy`: a kind's module is imported when it is first looked up, not before (a site that uses no SMS
    does not carry the modem code in memory); which modules are kinds is read from their source, a
    top-level `KIND = "name"` line, and checked again when the module is imported."""
    pkg = importlib.import_module(package)
    if lazy:
        return _LazyKinds(package, role, pkg.__path__)
    found: dict[str, Kind] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if getattr(module, "KIND", None) is None:
            continue
        kind = _load_kind(module, role)
        if kind.name in found:
            raise TypeError(f"{role.lower()} kind {kind.name!r} is declared by {found[kind.name].module.__name__} and {module.__name__}")
        found[kind.name] = kind
    return MappingProxyType(dict(sorted(found.items())))


class _LazyKinds(Mapping[str, Kind]):
    def __init__(self, package: str, role: str, path: Any) -> None:
        from device_drivers.registry import declared_kinds

        self.package, self.role = package, role
        self.modules = {name: f"{package}.{module}" for name, module in sorted(declared_kinds(package, path).items())}
        self._loaded: dict[str, Kind] = {}

    def __getitem__(self, name: str) -> Kind:
        kind = self._loaded.get(name)
        if kind is None:
            module = importlib.import_module(self.modules[name])  # KeyError: no such kind
            if getattr(module, "KIND", None) != name:
                raise TypeError(f"{module.__name__} declares KIND {getattr(module, 'KIND', None)!r}, not {name!r}")
            kind = self._loaded[name] = _load_kind(module, self.role)
        return kind

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, name: object) -> bool:
        return name in self.modules


def parse_kind_table(raw: Any, path: str, kinds: Mapping[str, Kind], label: str, error_type: type[FieldError]) -> Any:
    """One table with a `kind` key → that kind's typed Config."""
    if not isinstance(raw, Mapping):
        raise error_type(path, f"expected a table, got {type(raw).__name__}")
    known = ", ".join(kinds)
    if "kind" not in raw:
        raise error_type(f"{path}.kind", f"missing required key; known kinds: {known}")
    name = raw["kind"]
    if not isinstance(name, str) or name not in kinds:
        raise error_type(f"{path}.kind", f"unknown {label} kind {name!r}; known kinds: {known}")
    return kinds[name].config.from_dict(raw, path)
