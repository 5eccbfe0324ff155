"""Simulated Modbus slaves (real pymodbus servers) that serve a site configuration's points.

Used by `yujing demo`, the test suite and the benchmarks. Values are written through the same
codec the gateway decodes with (in reverse), so "what the device serves" is exact and testable.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from device_drivers.registers import WORD_TYPES, PointSpec, Table, encode_words
from gateway.config import DeviceConfig

_BLOCK = {Table.COIL: "c", Table.DISCRETE: "d", Table.HOLDING: "h", Table.INPUT: "i"}
_SET_FC = {Table.COIL: 15, Table.DISCRETE: 2, Table.HOLDING: 16, Table.INPUT: 4}


def raw_for(point: PointSpec, value: float | int | bool | Decimal) -> int | float | bool:
    """The raw register value that decodes to `value` (rounded to what the registers can hold)."""
    if point.table.is_bits or point.type == "bit":
        return bool(value)
    if WORD_TYPES[point.type][2]:
        return (float(value) - float(point.offset)) / float(point.scale)
    raw = ((Decimal(str(value)) - point.offset) / point.scale).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    return int(raw)


@dataclass
class SimSlave:
    """One simulated device: four register tables, request counting and injectable faults."""

    unit: int
    size: int = 256
    requests: dict[int, int] = field(default_factory=dict)  # function code → count
    exception: int | None = None  # answer every request with this Modbus exception
    refuse_multi: bool = False  # answer ILLEGAL_ADDRESS to reads of more than one register (a picky device)
    coil_writes: list[tuple[int, bool, float]] = field(default_factory=list)
    clock: Callable[[], float] | None = None
    # Called with the live register block before every register read: a test computes the device's
    # values from its own (virtual) clock, so readings follow a scripted curve whatever the poll rate.
    before_read: Callable[[list[int]], None] | None = None

    def device(self) -> SimDevice:
        def block(bits: bool) -> list[SimData]:
            if bits:
                return [SimData(0, count=self.size, values=False, datatype=DataType.BITS)]
            return [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(id=self.unit, simdata=(block(True), block(True), block(False), block(False)), action=self._action)

    async def _action(self, fc, start, address, count, registers, values):  # type: ignore[no-untyped-def]
        self.requests[fc] = self.requests.get(fc, 0) + 1
        if self.exception is not None:
            return ExcCodes(self.exception)
        if self.refuse_multi and values is None and count > 1:
            return ExcCodes.ILLEGAL_ADDRESS
        if self.before_read is not None and values is None and fc in (3, 4):
            self.before_read(registers)
        if fc == 5 and values is not None:
            self.coil_writes.append((address, bool(values[0]), self.clock() if self.clock else 0.0))
        return None

    @property
    def reads(self) -> int:
        return sum(n for fc, n in self.requests.items() if fc in (1, 2, 3, 4))


class SimServer:
    """A pymodbus server (TCP, or RTU on a serial port) hosting several SimSlaves."""

    def __init__(self, slaves: list[SimSlave], *, tcp: tuple[str, int] | None = None, serial: dict | None = None) -> None:
        self.slaves = {s.unit: s for s in slaves}
        devices = [s.device() for s in slaves]
        if tcp is not None:
            self.server = ModbusTcpServer(devices, address=tcp, ignore_missing_devices=True)
        else:
            self.server = ModbusSerialServer(devices, ignore_missing_devices=True, **(serial or {}))

    async def start(self) -> None:
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        await self.server.shutdown()

    async def set_point(self, unit: int, point: PointSpec, value: float | int | bool | Decimal) -> None:
        await self.set_raw(unit, point, raw_for(point, value))

    async def set_raw(self, unit: int, point: PointSpec, raw: int | float | bool) -> None:
        if point.table.is_bits:
            await self.server.async_setValues(unit, _SET_FC[point.table], point.address, [bool(raw)])
            return
        if point.type == "bit":
            current = await self.server.async_getValues(unit, 3 if point.table is Table.HOLDING else 4, point.address, 1)
            word = current[0] if isinstance(current, list) else 0
            mask = 1 << (point.bit or 0)
            word = (word | mask) if raw else (word & ~mask)
            await self.server.async_setValues(unit, _SET_FC[point.table], point.address, [word])
            return
        await self.server.async_setValues(unit, _SET_FC[point.table], point.address, encode_words(point, raw))

    async def coil(self, unit: int, address: int) -> bool:
        bits = await self.server.async_getValues(unit, 1, address, 1)
        return bool(bits[0]) if isinstance(bits, list) else False


# ---------------------------------------------------------------- how values move


def site_value(device: DeviceConfig, point: PointSpec, t: float, rng: random.Random) -> float | int | bool:
    """A plausible value for a point at time t (seconds): slow cycles plus a little noise.

    Known point names get physical behaviour (a reservoir level that rises and falls, a rain counter
    that only grows, a crack that creeps); anything else wanders inside its declared range.
    """
    name = point.name.lower()
    if point.table.is_bits or point.type == "bit":
        return int(t // 30) % 2 == 0
    if "gap" in name:  # radar air gap (mm) over a reservoir oscillating around 1953.2 m
        level = 1953.2 + 0.4 * math.sin(2 * math.pi * t / 900) + rng.uniform(-0.003, 0.003)
        return round((1963.0 - level) * 1000)
    if "rain" in name or "total" in name:
        return round(123.4 + 0.1 * int(t / 7), 1)
    if "crack" in name:
        return round(12.0 + 0.002 * t + rng.uniform(-0.01, 0.01), 2)
    lo = point.min if point.min is not None else 0.0
    hi = point.max if point.max is not None else 100.0
    mid, amp = (lo + hi) / 2, (hi - lo) / 4
    v = mid + amp * math.sin(2 * math.pi * t / 300 + point.address) + rng.uniform(-amp / 50, amp / 50)
    if WORD_TYPES[point.type][2]:
        return v
    step = float(point.scale)
    return round(round(v / step) * step, 6)
