"""Reading a configuration table field by field, collecting every problem (not just the first), each
named by its key path (`devices[1].points[0].scale`). The gateway's site-file reader and every driver's
config parser use it, so `yujing check` reports the whole file in one pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # no MQTT wildcards or separators
ID_HINT = "letters, digits, '_', '.', '-' (no '/', '+', '#')"


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None


class Reader:
    """Takes typed fields out of one TOML table; whatever is left at the end is an unknown key."""

    def __init__(self, table: Any, path: str, errors: list[Problem]) -> None:
        self.path = path
        self.errors = errors
        self.ok = isinstance(table, dict)
        self.table: dict[str, Any] = dict(table) if self.ok else {}
        self.asked: list[str] = []  # every key a getter asked for: the valid keys, for "did you mean"
        if not self.ok:
            self.error("", f"expected a table, got {_type_name(table)}")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> None:
        self.errors.append(Problem(self.key(name) if name else self.path, message))

    def get(self, name: str, types: type | tuple[type, ...], default: Any = ..., *, check=None, hint: str = "") -> Any:
        self.asked.append(name)
        if name not in self.table:
            if default is ...:
                if self.ok:
                    self.error(name, "missing (required)")
                return None
            return default
        value = self.table.pop(name)
        types_ = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types_:
            good = False
        else:
            good = isinstance(value, types_)
        if not good:
            want = " or ".join(_type_name_of(t) for t in types_)
            self.error(name, f"expected {want}, got {_type_name(value)} {value!r}")
            return None if default is ... else default
        if check is not None and not check(value):
            self.error(name, f"invalid value {value!r}{': ' + hint if hint else ''}")
            return None if default is ... else default
        return value

    def take(self, name: str) -> Any:
        """Remove and return a raw value (a sub-table parsed elsewhere); None when absent."""
        self.asked.append(name)
        return self.table.pop(name, None)

    def finish(self, *, also: tuple[str, ...] = ()) -> None:
        """Every key nobody asked for is an error, with the nearest valid key as a suggestion."""
        import difflib

        for name in self.table:
            near = difflib.get_close_matches(name, [*self.asked, *also], n=1, cutoff=0.6)
            self.error(name, f"unknown key (did you mean {near[0]!r}?)" if near else "unknown key")


def _type_name_of(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "an array", dict: "a table"}.get(t, t.__name__)


def _type_name(v: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "table"}.get(type(v), type(v).__name__)


NUMBER = (int, float)


def positive(v: float) -> bool:
    return v > 0


def non_negative(v: float) -> bool:
    return v >= 0




def decimal(v: int | float) -> Decimal:
    # str() gives the digits the technician wrote (0.001, not 0.001000000000000000020816…)
    return Decimal(str(v))
