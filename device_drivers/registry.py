"""The driver kinds, found by scanning `device_drivers/drivers/`: one module each (see device_drivers.base).

A module is checked when it is found: it must declare KIND, SAMPLE, parse_bus, parse_device and one class
whose name ends in `Driver`. A bus `type` that no module serves is a configuration error listing the known
ones.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType, ModuleType
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
    """Bus type name → its driver kind."""
    from . import drivers

    found: dict[str, DriverKind] = {}
    for info in pkgutil.iter_modules(drivers.__path__):
        module = importlib.import_module(f"{drivers.__name__}.{info.name}")
        names = getattr(module, "KIND", None)
        if names is None:
            continue
        names = (names,) if isinstance(names, str) else tuple(names)
        classes = [c for n, c in inspect.getmembers(module, inspect.isclass) if n.endswith("Driver") and c.__module__ == module.__name__]
        missing = [a for a in ("SAMPLE", "parse_bus", "parse_device") if not hasattr(module, a)]
        if missing or len(classes) != 1:
            raise TypeError(f"driver module {module.__name__} lacks {missing or 'exactly one *Driver class'}")
        kind = DriverKind(module, names, module.SAMPLE, classes[0])
        for name in names:
            if name in found:
                raise TypeError(f"bus type {name!r} is served by {found[name].module.__name__} and {module.__name__}")
            found[name] = kind
    return MappingProxyType(found)
