"""Coil action: one relay of a Modbus relay module (function 05), on while the watched alarms are at
or above a level. The usual way to drive a 声光报警器 (siren and light), a strobe or a fan interlock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ._parse import Table
from .base import BusOutput, Context
from .common import BusOutputConfig, parse_bus_output

KIND = "coil"

SAMPLE = """\
[[actions]]
kind = "coil"
name = "slope.siren"                # unique; letters, digits and _ . -
description = "声光报警器 on the slope relay module"
# On while any matching rule shows this level or higher (latched levels included), off otherwise.
# Rules are ids or globs ("gas.*"); each must match at least one rule.
when = { rules = ["crack.*", "tilt.*", "rain.*"], level = "II_ORANGE" }   # level also "orange"
bus = "rs485-a"                     # a [[buses]] name; the write shares the bus with polling, ahead of it
unit = 10                           # Modbus unit of the relay module (1..247 on RS-485)
address = 0                         # coil number (0 = first relay)
# invert = false                    # true: the relay is energised for OFF (normally-closed wiring)
"""


@dataclass(frozen=True, kw_only=True)
class Config(BusOutputConfig):
    kind: ClassVar[str] = KIND
    invert: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one action table; raises ActionConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_bus_output(t, KIND)
        invert = t.boolean("invert", False)
        t.finish()
        return cls(**args, invert=invert)


class CoilAction(BusOutput):
    table = "coil"

    def __init__(self, config: Config, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._invert = config.invert

    def value(self, on: bool) -> bool:
        """The coil state for `on` (inverted when so configured)."""
        return on != self._invert
