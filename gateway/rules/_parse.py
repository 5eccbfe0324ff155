"""Reading one config table with errors that name the field (`rules[3].levels[1].clear`).

Every getter records the key it was asked for; `finish()` then rejects any key nobody asked for, so a typo
is an error instead of a silently ignored option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from .errors import RuleConfigError
from .levels import Level

_MISSING: Any = object()


class Table:
    def __init__(self, raw: object, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise RuleConfigError(path, f"expected a table, got {type(raw).__name__}")
        for key in raw:
            if not isinstance(key, str):
                raise RuleConfigError(path, f"keys must be strings, got {key!r}")
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
            raise RuleConfigError(self.at(key), "missing required key")
        return default

    def error(self, key: str, reason: str) -> RuleConfigError:
        return RuleConfigError(self.at(key), reason)

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

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        positive: bool = False,
        non_negative: bool = False,
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
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

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be ≥ {minimum}, got {value}")
        return value

    def level(self, key: str, default: Any = _MISSING, *, allow_none: bool = False) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a level name such as \"III_YELLOW\", got {value!r}")
        try:
            level = Level.parse(value)
        except ValueError as e:
            raise self.error(key, str(e)) from None
        if level == Level.NONE and not allow_none:
            raise self.error(key, "NONE is not an alarm level here")
        return level

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RuleConfigError(f"{self.at(key)}[{i}]", f"expected a string, got {item!r}")
        return tuple(value)

    def table(self, key: str) -> Table | None:
        value = self._get(key, None)
        return None if value is None else Table(value, self.at(key))

    def tables(self, key: str) -> list[Table]:
        value = self._get(key, _MISSING)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.error(key, f"expected a list of tables, got {value!r}")
        return [Table(item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]

    def finish(self) -> None:
        """Reject keys that no getter asked for."""
        for key in self.raw:
            if key not in self._known:
                known = ", ".join(sorted(self._known))
                raise self.error(key, f"unknown key; known keys here: {known}")
