"""Register action: one holding register (function 06) set to one value while the watched alarms are at
or above a level and to another otherwise. For controllers that take a command word (a PLC, an alarm
panel's "pattern" register) rather than a relay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ._parse import Table
from .base import BusOutput, Context
from .common import BusOutputConfig, parse_bus_output

KIND = "register"

SAMPLE = """\
[[actions]]
kind = "register"
name = "panel.pattern"              # unique; letters, digits and _ . -
description = "Alarm panel: pattern 3 (fast flash + tone) while a gas alarm is orange or worse"
when = { rules = ["gas.*"], level = "II_ORANGE" }
bus = "rs485-b"                     # a [[buses]] name
unit = 30                           # Modbus unit (1..247 on RS-485)
address = 16                        # holding register number (0-based, as on the wire)
value_on = 3                        # written while on (0..65535)
value_off = 0                       # written while off (0..65535)
"""

_MAX_WORD = 0xFFFF


@dataclass(frozen=True, kw_only=True)
class Config(BusOutputConfig):
    kind: ClassVar[str] = KIND
    value_on: int
    value_off: int

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one action table; raises ActionConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_bus_output(t, KIND)
        value_on = t.integer("value_on", minimum=0, maximum=_MAX_WORD)
        value_off = t.integer("value_off", minimum=0, maximum=_MAX_WORD)
        if value_on == value_off:
            raise t.error("value_off", f"equals value_on ({value_on}): the output could never change")
        t.finish()
        return cls(**args, value_on=value_on, value_off=value_off)


class RegisterAction(BusOutput):
    table = "register"

    def __init__(self, config: Config, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._on, self._off = config.value_on, config.value_off

    def value(self, on: bool) -> int:
        """The register value for `on`."""
        return self._on if on else self._off
