"""What the gateway process does not load until something needs it.

paho-mqtt imports `urllib.request` at import time (3.4 MB resident: http, email, hashlib, bz2, lzma …) for
one thing: reading proxy settings from the environment, which it does only when PySocks is installed. The
gateway does not install PySocks. So that module is registered as a stand-in whose first attribute lookup
imports the real module, whole and unchanged, and hands over to it: if nothing ever asks, it is never
loaded. bench/edge_bench.py measures the resident memory this saves.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

DEFERRED = ("urllib.request",)


class _Deferred(types.ModuleType):
    """Only attributes the stand-in does not have reach __getattr__ (__spec__, __name__ … do not)."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)  # now the real thing, for good
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, real)
        return getattr(real, attr)


def defer_unused_imports(names: tuple[str, ...] = DEFERRED) -> None:
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        stand_in = _Deferred(name)
        stand_in.__spec__ = spec
        sys.modules[name] = stand_in
