"""Value types that flow from the drivers through the gateway. Frozen and slotted: stages never mutate what they receive."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple, Union

Value = Union[bool, int, float, Decimal, None]


class Quality(enum.IntEnum):
    """Why a reading is not good. Codes are part of the wire format (docs/wire-format.md)."""

    GOOD = 0
    TIMEOUT = 1
    FRAMING = 2  # CRC error, short or garbled frame
    DECODE = 3  # bytes arrived but do not make a value of the declared type (e.g. NaN)
    OUT_OF_RANGE = 4  # outside the point's declared min/max
    OFFLINE = 5  # device is offline and was not polled this cycle
    TRANSPORT = 6  # port or connection unavailable
    DEVICE_FAULT = 7  # the device says its reading is not valid: a status bit, a fault code, a dead 4-20 mA loop
    # Modbus exception n is sent as MODBUS_EXCEPTION | n (0x81 illegal function, 0x82 illegal address, ...)
    MODBUS_EXCEPTION = 0x80


def modbus_exception_quality(code: int) -> int:
    return int(Quality.MODBUS_EXCEPTION) | (code & 0x7F)


def quality_name(code: int) -> str:
    if code & 0x80:
        return f"modbus_exception_{code & 0x7F:02d}"
    try:
        return Quality(code).name.lower()
    except ValueError:
        return f"unknown_{code}"


class Reading(NamedTuple):
    """One observation of one point. `point` is the index in the gateway's point catalogue.

    A NamedTuple rather than a frozen dataclass: it is made once per register read, and tuple
    construction is several times cheaper on a Pi-class CPU.
    """

    point: int
    ts_ms: int
    value: Value
    quality: int = Quality.GOOD

    @property
    def good(self) -> bool:
        return self.quality == Quality.GOOD


@dataclass(frozen=True, slots=True)
class PointInfo:
    """What the birth message says about a point, so data messages can refer to it by index."""

    device: str
    name: str
    unit: str
    type: str
