"""Reading one action table with errors that name the field (`actions[2].when.rules[0]`).

Every getter records the key it was asked for; `finish()` then rejects any key nobody asked for, so a typo
is an error instead of a silently ignored option. (The same shape as `gateway.rules._parse`, raising
ActionConfigError: the two packages do not import each other's internals.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.rules.levels import Level

from .errors import ActionConfigError

_MISSING: Any = object()


class Table:
    def __init__(self, raw: object, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ActionConfigError(path, f"expected a table, got {type(raw).__name__}")
        for key in raw:
            if not isinstance(key, str):
                raise ActionConfigError(path, f"keys must be strings, got {key!r}")
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
        if default is _MISSING:
            raise ActionConfigError(self.at(key), "missing required key")
        return default

    def error(self, key: str, reason: str) -> ActionConfigError:
        return ActionConfigError(self.at(key), reason)

    def string(self, key: str, default: Any = _MISSING, *, choices: Sequence[str] | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise self.error(key, f"expected a finite number, got {value!r}")
        if positive and number <= 0:
            raise self.error(key, f"must be > 0, got {value!r}")
        return number

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None, maximum: int | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            lo = "" if minimum is None else str(minimum)
            hi = "" if maximum is None else str(maximum)
            raise self.error(key, f"must be in {lo}..{hi}, got {value}")
        return value

    def level(self, key: str, default: Any = _MISSING) -> Any:
        """A level name ("II_ORANGE") or colour ("orange"); NONE is not an alarm level here."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a level name such as \"II_ORANGE\" or \"orange\", got {value!r}")
        try:
            level = Level.parse(value)
        except ValueError as e:
            raise self.error(key, str(e)) from None
        if level == Level.NONE:
            raise self.error(key, "NONE is not an alarm level here; use IV_BLUE (blue) or higher")
        return level

    def strings(self, key: str, default: Any = _MISSING, *, non_empty: bool = False) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        if non_empty and not value:
            raise self.error(key, "must not be empty")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ActionConfigError(f"{self.at(key)}[{i}]", f"expected a string, got {item!r}")
            if non_empty and not item:
                raise ActionConfigError(f"{self.at(key)}[{i}]", "must not be empty")
        return tuple(value)

    def table(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        return Table(value, self.at(key))

    def finish(self) -> None:
        """Reject keys that no getter asked for."""
        for key in self.raw:
            if key not in self._known:
                known = ", ".join(sorted(self._known))
                raise self.error(key, f"unknown key; known keys here: {known}")
