"""Modbus point definitions and the pure codec from registers/bits to engineering values.

No I/O here: `decode(point, words)` turns the 16-bit words a device returned into a value, so every
data type, byte order and word order is tested byte-exactly without a device.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from .model import Quality, Value


class Table(enum.Enum):
    COIL = "coil"
    DISCRETE = "discrete"
    INPUT = "input"
    HOLDING = "holding"

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)


# data type → (number of 16-bit registers, struct code for the big-endian bytes, is float)
WORD_TYPES: dict[str, tuple[int, str, bool]] = {
    "int16": (1, ">h", False),
    "uint16": (1, ">H", False),
    "int32": (2, ">i", False),
    "uint32": (2, ">I", False),
    "float32": (2, ">f", True),
    "int64": (4, ">q", False),
    "uint64": (4, ">Q", False),
    "float64": (4, ">d", True),
}
BIT_TYPES = ("bool",)  # a coil or discrete input
REGISTER_BIT_TYPE = "bit"  # one bit of a holding/input register
DATA_TYPES = tuple(WORD_TYPES) + BIT_TYPES + (REGISTER_BIT_TYPE,)
ORDERS = ("big", "little")


@dataclass(frozen=True, slots=True)
class PointValidity:
    """When a device says a point's reading is not valid, so that it travels as DEVICE_FAULT, not as a
    good number: raw values that are fault codes (a detector's 0xFFFF), a valid range of the raw value
    (a 4-20 mA channel in µA: below 3.8 mA or above 20.5 mA is a broken loop or a failed transmitter, NAMUR
    NE 43), and status points of the same device read in the same poll (`flags`: fault while true,
    `valid`: fault while false or unreadable)."""

    codes: frozenset[int] = frozenset()
    raw_min: float | None = None
    raw_max: float | None = None
    flags: tuple[str, ...] = ()
    valid: tuple[str, ...] = ()

    @property
    def checks_raw(self) -> bool:
        return bool(self.codes) or self.raw_min is not None or self.raw_max is not None


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One point of a device: where it lives and how to turn its registers into a value.

    `scale` and `offset` are Decimals so that integer registers scale exactly (9617 × 0.001 = 9.617).
    """

    name: str
    table: Table
    address: int
    type: str
    byte_order: str = "big"  # order of the two bytes inside each register
    word_order: str = "big"  # "big": the first register holds the most significant word
    bit: int | None = None  # for type "bit"
    scale: Decimal = Decimal(1)
    offset: Decimal = Decimal(0)
    unit: str = ""
    min: float | None = None
    max: float | None = None
    validity: PointValidity | None = None

    @property
    def count(self) -> int:
        """Registers (or bits) the point occupies."""
        if self.table.is_bits or self.type == REGISTER_BIT_TYPE:
            return 1
        return WORD_TYPES[self.type][0]

    @property
    def end(self) -> int:
        return self.address + self.count


class DecodeError(ValueError):
    pass


def _raw_bytes(words: list[int], byte_order: str, word_order: str) -> bytes:
    ws = words if word_order == "big" else list(reversed(words))
    if byte_order == "big":
        return b"".join(w.to_bytes(2, "big") for w in ws)
    return b"".join(w.to_bytes(2, "little") for w in ws)


def encode_words(point: PointSpec, raw: int | float) -> list[int]:
    """The registers a device would hold for a raw (unscaled) value; the inverse of decode, for simulators."""
    n, code, _ = WORD_TYPES[point.type]
    data = struct.pack(code, raw)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if point.byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if point.word_order == "little":
        words.reverse()
    return words


def decode_raw(point: PointSpec, words: list[int]) -> int | float | bool:
    """Registers → raw value of the declared type, before scaling."""
    if point.type == REGISTER_BIT_TYPE:
        return bool((words[0] >> (point.bit or 0)) & 1)
    n, code, _ = WORD_TYPES[point.type]
    if len(words) != n:
        raise DecodeError(f"point {point.name}: {point.type} needs {n} registers, got {len(words)}")
    return struct.unpack(code, _raw_bytes(words, point.byte_order, point.word_order))[0]


def scale(point: PointSpec, raw: int | float | bool) -> Value:
    """Apply scale and offset: exactly (Decimal) for integers, in binary floating point for floats."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise DecodeError(f"point {point.name}: {raw} is not a number")
        if point.scale == 1 and point.offset == 0:
            return raw
        return raw * float(point.scale) + float(point.offset)
    if point.scale == 1 and point.offset == 0:
        return raw
    return raw * point.scale + point.offset


def in_range(point: PointSpec, value: Value) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if point.min is not None and value < point.min:
        return False
    if point.max is not None and value > point.max:
        return False
    return True


Decoder = Callable[[Sequence[int] | Sequence[bool]], tuple[Value, int]]


def status_gates(points: Sequence[PointSpec]) -> list[tuple[int, tuple[tuple[int, bool], ...]]]:
    """For each point gated by status points of its own device: (its index, ((status index, is_flag), …)).
    Names were checked when the configuration was read."""
    index = {p.name: i for i, p in enumerate(points)}
    gates = []
    for i, p in enumerate(points):
        if p.validity is not None and (p.validity.flags or p.validity.valid):
            gates.append((i, tuple((index[n], True) for n in p.validity.flags) + tuple((index[n], False) for n in p.validity.valid)))
    return gates


def apply_status_gates(gates: Sequence[tuple[int, tuple[tuple[int, bool], ...]]], results: dict[int, tuple[Value, int]]) -> None:
    """After a whole poll is decoded: a point whose status points say fault (or could not be read) becomes
    DEVICE_FAULT with no value (what it read is no measurement), whatever order the points were read in."""
    for target, statuses in gates:
        quality = results[target][1]
        if quality not in (Quality.GOOD, Quality.OUT_OF_RANGE):
            continue
        for j, is_flag in statuses:
            status, status_quality = results[j]
            if status_quality != Quality.GOOD or status is None or bool(status) is is_flag:
                results[target] = (None, Quality.DEVICE_FAULT)
                break


def compile_point(point: PointSpec) -> Decoder:
    """A decoder specialised for one point, equivalent to `evaluate` (tested so) but built once:
    the poll loop calls it for every point of every poll."""
    if point.table.is_bits:
        def bits_(b):  # type: ignore[no-untyped-def]
            return (bool(b[0]), Quality.GOOD) if b else (None, Quality.DECODE)
        return bits_
    if point.type == REGISTER_BIT_TYPE:
        mask = 1 << (point.bit or 0)

        def bit_(w):  # type: ignore[no-untyped-def]
            return (bool(w[0] & mask), Quality.GOOD) if w else (None, Quality.DECODE)
        return bit_
    n, code, is_float = WORD_TYPES[point.type]
    if n == 1 and point.byte_order == "big":
        if point.type == "uint16":
            def raw(w):  # type: ignore[no-untyped-def]
                return w[0]
        else:
            def raw(w):  # type: ignore[no-untyped-def]
                v = w[0]
                return v - 0x10000 if v & 0x8000 else v
    else:
        words_st = struct.Struct(">" + "H" * n)
        value_st = struct.Struct(code)
        swap_words = point.word_order == "little"
        swap_bytes = point.byte_order == "little"

        def raw(w):  # type: ignore[no-untyped-def]
            data = words_st.pack(*(w[::-1] if swap_words else w))
            if swap_bytes:
                b = bytearray(data)
                b[0::2], b[1::2] = data[1::2], data[0::2]
                data = bytes(b)
            return value_st.unpack(data)[0]

    plain = point.scale == 1 and point.offset == 0
    fscale, foffset = float(point.scale), float(point.offset)
    dscale, doffset = point.scale, point.offset
    lo, hi = point.min, point.max
    checked = lo is not None or hi is not None
    validity = point.validity if point.validity is not None and point.validity.checks_raw else None
    codes = validity.codes if validity else frozenset()
    raw_lo = validity.raw_min if validity else None
    raw_hi = validity.raw_max if validity else None

    def decode(w):  # type: ignore[no-untyped-def]
        if len(w) != n:
            return None, Quality.DECODE
        v = raw(w)
        if validity is not None and (v in codes or (raw_lo is not None and v < raw_lo) or (raw_hi is not None and v > raw_hi)):
            return None, Quality.DEVICE_FAULT  # a fault code or a dead loop is no measurement: no value
        if is_float:
            if v != v or v in (math.inf, -math.inf):
                return None, Quality.DECODE
            if not plain:
                v = v * fscale + foffset
        elif not plain:
            v = v * dscale + doffset
        if checked and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            return v, Quality.OUT_OF_RANGE
        return v, Quality.GOOD

    return decode


def evaluate(point: PointSpec, words: list[int] | None = None, bits: list[bool] | None = None) -> tuple[Value, int]:
    """Raw registers or bits → (value, quality). Never raises for bad device data."""
    try:
        if point.table.is_bits:
            if not bits:
                raise DecodeError(f"point {point.name}: no bit returned")
            return bool(bits[0]), Quality.GOOD
        raw_value = decode_raw(point, words or [])
        v = point.validity
        if v is not None and not isinstance(raw_value, bool) and (
                raw_value in v.codes or (v.raw_min is not None and raw_value < v.raw_min) or (v.raw_max is not None and raw_value > v.raw_max)):
            return None, Quality.DEVICE_FAULT
        value = scale(point, raw_value)
    except DecodeError:
        return None, Quality.DECODE
    if not in_range(point, value):
        return value, Quality.OUT_OF_RANGE
    return value, Quality.GOOD
