"""The driver kinds, found by scanning `device_drivers/drivers/`: one module each (see device_drivers.base).

A module is imported and checked when a site first uses one of its bus types: it must declare KIND,
SAMPLE, parse_bus, parse_device and one class whose name ends in `Driver`. A bus `type` that no module serves is a configuration error listing the known
ones.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class DriverKind:
    module: ModuleType
    kinds: tuple[str, ...]
    sample: str
    driver: type

    def parse_bus(self, r: Any, kind: str) -> Any:
        return self.module.parse_bus(r, kind)

    def parse_device(self, r: Any, bus: Any) -> Any:
        return self.module.parse_device(r, bus)

    def check(self, buses: Any, devices: Any, errors: Any) -> None:
        check = getattr(self.module, "check", None)
        if check is not None:
            check(buses, devices, errors)


@cache
def kinds() -> Mapping[str, DriverKind]:
    """Bus type name → its driver kind.

    Which module serves which type is read from the modules' source (a top-level `KIND = …` line); a module
    is imported, and checked, when a site first asks for one of its types: a Modbus-only gateway does not
    carry the serial-line or SL 651 code in memory (0.7 MB resident, bench/edge_bench.py)."""
    from . import drivers

    return _Lazy(drivers.__name__, drivers.__path__)


_KIND_LINE = re.compile(r"^KIND\s*=\s*(.+?)\s*(?:#.*)?$", re.MULTILINE)


def declared_kinds(package: str, path: Any) -> dict[str, str]:
    """Kind name → module name, for the modules of a package, read from their source (a top-level literal
    `KIND = "name"` or a tuple of names) without importing them. Modules starting with "_" are skipped; a
    name declared twice is a TypeError naming both modules. Shared with gateway.plugins."""
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(path):
        if info.name.startswith("_"):
            continue
        spec = importlib.util.find_spec(f"{package}.{info.name}")
        try:
            source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
        except OSError:
            continue
        m = _KIND_LINE.search(source)
        if m is None:
            continue
        names = ast.literal_eval(m.group(1))
        for name in (names,) if isinstance(names, str) else tuple(names):
            if name in found:
                raise TypeError(f"kind {name!r} is declared by {package}.{found[name]} and {package}.{info.name}")
            found[name] = info.name
    return found


class _Lazy(Mapping[str, DriverKind]):
    def __init__(self, package: str, path: Any) -> None:
        self.package = package
        self.modules = declared_kinds(package, path)  # bus type → module name
        self.loaded: dict[str, DriverKind] = {}  # module name → its kind

    def __getitem__(self, name: str) -> DriverKind:
        module_name = self.modules[name]
        kind = self.loaded.get(module_name)
        if kind is None:
            kind = self.loaded[module_name] = _load(importlib.import_module(f"{self.package}.{module_name}"))
            if name not in kind.kinds:
                raise TypeError(f"driver module {kind.module.__name__}: its KIND {kind.kinds} does not hold {name!r}")
        return kind

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _load(module: ModuleType) -> DriverKind:
    names = module.KIND
    names = (names,) if isinstance(names, str) else tuple(names)
    classes = [c for n, c in inspect.getmembers(module, inspect.isclass) if n.endswith("Driver") and c.__module__ == module.__name__]
    missing = [a for a in ("SAMPLE", "parse_bus", "parse_device") if not hasattr(module, a)]
    if missing or len(classes) != 1:
        raise TypeError(f"driver module {module.__name__} lacks {missing or 'exactly one *Driver class'}")
    return DriverKind(module, names, module.SAMPLE, classes[0])
