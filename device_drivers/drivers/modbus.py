"""Modbus TCP and RTU (RS-485): register maps, data types, byte and word order, scaling, coalesced reads.

The bus types `tcp` and `rtu`. Points are read in as few requests as the device allows (device_drivers.plan);
a device that refuses a coalesced read (exception 02/03) is read point by point from then on. Outputs
(coils and holding registers) are written through the same transaction slot, ahead of polls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..base import Device, DeviceError, Link, Result, TransportError
from ..fields import ID_HINT, ID_RE, NUMBER, Problem, Reader, decimal, non_negative, positive
from ..model import Quality, modbus_exception_quality, quality_name
from ..modbus import ModbusTransport, SerialSettings, TcpSettings
from ..plan import MODBUS_MAX_BITS, MODBUS_MAX_REGISTERS, Request, plan_requests
from ..registers import (
    BIT_TYPES,
    DATA_TYPES,
    ORDERS,
    REGISTER_BIT_TYPE,
    WORD_TYPES,
    Decoder,
    PointSpec,
    PointValidity,
    Table,
    apply_status_gates,
    compile_point,
    status_gates,
)

KIND = ("tcp", "rtu")

SAMPLE = """\
[[buses]]
name = "rs485-a"
type = "rtu"                # "rtu": Modbus RTU on a serial port; "tcp": Modbus TCP
port = "/dev/ttyUSB0"       # tcp: host = "192.168.10.50", port = 502
# baudrate = 9600           # 1200 … 115200
# bytesize = 8              # 7 or 8
# parity = "N"              # "N", "E" or "O"
# stopbits = 1
# timeout_s = 0.3           # per transaction (tcp: 1.0)
# pause_s = 0.0             # quiet time on the wire between two transactions
# reply_guard_s = 0.0       # rtu: listen this long after each reply; a second reply makes it a framing error

[[devices]]
name = "level"
bus = "rs485-a"
unit = 1                    # 1..247 on a serial bus, 0..255 over TCP
interval_s = 10
# coalesce = true           # read neighbouring points in one request
# max_gap = 8               # registers of filler a coalesced read may span
# max_registers = 125       # per request (some devices need less)
# max_bits = 2000
  [[devices.points]]
  name = "gap"
  address = 0               # 0-based protocol address
  # table = "holding"       # "coil", "discrete", "input" or "holding"
  # type = "uint16"         # int16, uint16, int32, uint32, float32, int64, uint64, float64, bit, bool
  # byte_order = "big"      # the two bytes inside each register
  # word_order = "big"      # the registers of a 32/64-bit value
  # scale = 1               # value = raw × scale + offset, exactly in decimal
  # offset = 0
  unit = "mm"
  # min = 0                 # plausible range: outside it the reading is out_of_range
  # max = 20000
  # fault = { codes = [65535], raw_min = 3800, raw_max = 20500, flags = ["sensor_fault"], valid = ["ok"] }
"""

log = logging.getLogger("yujing.poll")

PARITIES = {"N": "N", "E": "E", "O": "O", "none": "N", "even": "E", "odd": "O"}
MAX_RTU_UNIT = 247

# A device answering "illegal address/value" to a coalesced read usually does not map a register in the
# filled gap, or caps the read length: read its points one by one from then on. Other exceptions (busy,
# device failure) are not about the request's shape, so they do not split it.
SPLIT_ON = {modbus_exception_quality(2), modbus_exception_quality(3)}


@dataclass(frozen=True)
class ModbusDevice:
    unit: int
    coalesce: bool = True
    max_gap: int = 8
    max_registers: int = MODBUS_MAX_REGISTERS
    max_bits: int = MODBUS_MAX_BITS


# ---------------------------------------------------------------------------------------------- configuration


def parse_bus(r: Reader, kind: str) -> TcpSettings | SerialSettings | None:
    timeout = r.get("timeout_s", NUMBER, 1.0 if kind == "tcp" else 0.3, check=positive, hint="> 0")
    if kind == "tcp":
        host = r.get("host", str)
        port = r.get("port", int, 502, check=lambda p: 0 < p < 65536, hint="1..65535")
        return TcpSettings(host, port, float(timeout)) if host else None
    port = r.get("port", str)
    baud = r.get("baudrate", int, 9600, check=lambda v: v in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200), hint="a standard rate (1200..115200)")
    bytesize = r.get("bytesize", int, 8, check=lambda v: v in (7, 8), hint="7 or 8")
    parity = r.get("parity", str, "N", check=lambda v: v in PARITIES, hint='"N", "E" or "O"')
    stopbits = r.get("stopbits", int, 1, check=lambda v: v in (1, 2), hint="1 or 2")
    guard = r.get("reply_guard_s", NUMBER, 0.0, check=lambda v: 0 <= v <= 1, hint="0 .. 1 second")
    return SerialSettings(port, baud, bytesize, PARITIES[parity or "N"], stopbits, float(timeout), float(guard or 0)) if port else None


def parse_device(r: Reader, bus: Any) -> tuple[ModbusDevice, tuple[PointSpec, ...]] | None:
    unit = r.get("unit", int, 1, check=lambda v: 0 <= v <= 255, hint="1..247 on a serial bus, 0..255 over TCP")
    coalesce = r.get("coalesce", bool, True)
    max_gap = r.get("max_gap", int, 8, check=lambda v: 0 <= v <= 124, hint="0..124")
    max_registers = r.get("max_registers", int, MODBUS_MAX_REGISTERS, check=lambda v: 1 <= v <= MODBUS_MAX_REGISTERS, hint=f"1..{MODBUS_MAX_REGISTERS}")
    max_bits = r.get("max_bits", int, MODBUS_MAX_BITS, check=lambda v: 1 <= v <= MODBUS_MAX_BITS, hint=f"1..{MODBUS_MAX_BITS}")
    raw_points = r.take("points") or []
    points: list[tuple[int, PointSpec]] = []
    if not isinstance(raw_points, list):
        r.error("points", "expected an array of tables ([[devices.points]])")
        raw_points = []
    for j, table in enumerate(raw_points):
        pr = Reader(table, f"{r.path}.points[{j}]", r.errors)
        if pr.ok:
            p = _point(pr, max_registers or MODBUS_MAX_REGISTERS)
            if p is not None:
                points.append((j, p))
    if not raw_points and r.ok:
        r.error("points", "a device needs at least one [[devices.points]]")
    _check_points(r, points)
    if bus is not None and isinstance(bus.settings, SerialSettings) and unit is not None and not 1 <= unit <= MAX_RTU_UNIT:
        r.error("unit", f"unit {unit} on serial bus {bus.name!r}: RS-485 slaves are 1..247 (0 is broadcast, nobody answers)")
        unit = None
    if unit is None or len(points) != len(raw_points):
        return None
    spec = ModbusDevice(unit, coalesce, max_gap, max_registers or MODBUS_MAX_REGISTERS, max_bits or MODBUS_MAX_BITS)
    return spec, tuple(p for _, p in points)


def _point(r: Reader, device_max: int) -> PointSpec | None:
    name = r.get("name", str, check=ID_RE.match, hint=ID_HINT)
    table_s = r.get("table", str, "holding", check=lambda v: v in {t.value for t in Table}, hint="coil, discrete, input or holding")
    table = Table(table_s) if table_s else Table.HOLDING
    address = r.get("address", int, check=lambda v: 0 <= v <= 65535, hint="0..65535 (0-based protocol address)")
    default_type = "bool" if table.is_bits else "uint16"
    dtype = r.get("type", str, default_type, check=lambda v: v in DATA_TYPES, hint=", ".join(DATA_TYPES))
    byte_order = r.get("byte_order", str, "big", check=lambda v: v in ORDERS, hint='"big" or "little"')
    word_order = r.get("word_order", str, "big", check=lambda v: v in ORDERS, hint='"big" or "little"')
    bit = r.get("bit", int, None, check=lambda v: 0 <= v <= 15, hint="0..15")
    scale = r.get("scale", NUMBER, 1, check=lambda v: v != 0, hint="not 0")
    offset = r.get("offset", NUMBER, 0)
    unit = r.get("unit", str, "")
    vmin = r.get("min", NUMBER, None)
    vmax = r.get("max", NUMBER, None)
    fault_table = r.get("fault", dict, None)
    validity = _validity(Reader(fault_table, r.key("fault"), r.errors), dtype) if fault_table is not None else None
    r.finish()
    if dtype is not None:
        if table.is_bits and dtype not in BIT_TYPES:
            r.error("type", f"{dtype} is a register type, but a {table.value} holds one bit: use type = \"bool\"")
            dtype = None
        elif not table.is_bits and dtype in BIT_TYPES:
            r.error("type", f"bool is for coils and discrete inputs; for one bit of a {table.value} register use type = \"bit\" and bit = N")
            dtype = None
        elif dtype == REGISTER_BIT_TYPE and bit is None:
            r.error("bit", "type \"bit\" needs bit = 0..15")
        elif dtype != REGISTER_BIT_TYPE and bit is not None:
            r.error("bit", f"bit is only for type \"bit\", this point is {dtype}")
    if dtype in WORD_TYPES and WORD_TYPES[dtype][0] > device_max:
        r.error("type", f"{dtype} needs {WORD_TYPES[dtype][0]} registers but the device reads at most {device_max}")
    if vmin is not None and vmax is not None and vmin > vmax:
        r.error("min", f"min {vmin} is more than max {vmax}")
    if address is not None and dtype in WORD_TYPES and address + WORD_TYPES[dtype][0] > 65536:
        r.error("address", f"{dtype} at {address} runs past register 65535")
    if name is None or address is None or dtype is None:
        return None
    return PointSpec(
        name=name, table=table, address=address, type=dtype, byte_order=byte_order or "big", word_order=word_order or "big",
        bit=bit, scale=decimal(scale or 1), offset=decimal(offset or 0), unit=unit or "", min=vmin, max=vmax, validity=validity,
    )


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _validity(r: Reader, dtype: str | None) -> PointValidity | None:
    """`fault = { codes = [65535], raw_min = 3800, raw_max = 20500, flags = ["sensor_fault"], valid = ["ok"] }`"""
    codes = r.get("codes", list, [], check=lambda v: all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                  hint="raw register values (integers) that mean the reading is not valid")
    raw_min = r.get("raw_min", NUMBER, None)
    raw_max = r.get("raw_max", NUMBER, None)
    flags = r.get("flags", list, [], check=_names, hint="names of points of this device: fault while true")
    valid = r.get("valid", list, [], check=_names, hint="names of points of this device: fault while false")
    r.finish()
    if raw_min is not None and raw_max is not None and raw_min > raw_max:
        r.error("raw_min", f"{raw_min} is more than raw_max {raw_max}")
    if (codes or raw_min is not None or raw_max is not None) and dtype in ("bool", REGISTER_BIT_TYPE):
        r.error("codes" if codes else "raw_min", "raw fault codes and ranges are for register values, not single bits")
    if not (codes or raw_min is not None or raw_max is not None or flags or valid):
        r.error("", "says nothing: give codes, raw_min/raw_max, flags or valid")
        return None
    return PointValidity(frozenset(codes or ()), raw_min, raw_max, tuple(flags or ()), tuple(valid or ()))


def _check_points(r: Reader, points: list[tuple[int, PointSpec]]) -> None:
    seen: dict[str, int] = {}
    for j, p in points:
        if p.name in seen:
            r.errors.append(Problem(f"{r.path}.points[{j}].name", f"point {p.name!r} is already defined at points[{seen[p.name]}]"))
        seen.setdefault(p.name, j)
    for j, p in points:
        if p.validity is None:
            continue
        for key in ("flags", "valid"):
            for k, status in enumerate(getattr(p.validity, key)):
                if status == p.name:
                    r.errors.append(Problem(f"{r.path}.points[{j}].fault.{key}[{k}]", f"{status!r} is this point itself"))
                elif status not in seen:
                    known = ", ".join(sorted(seen)) or "none"
                    r.errors.append(Problem(f"{r.path}.points[{j}].fault.{key}[{k}]",
                                            f"no point {status!r} on this device (its points: {known}); a status point must be read in the same poll"))
    # Two points may share registers only when they decode them the same way (or pick single bits).
    for a_idx, (_, a) in enumerate(points):
        for jb, b in points[a_idx + 1 :]:
            if a.table is not b.table or a.address >= b.end or b.address >= a.end:
                continue
            if REGISTER_BIT_TYPE in (a.type, b.type) or a.table.is_bits:
                continue
            if (a.address, a.type, a.byte_order, a.word_order) == (b.address, b.type, b.byte_order, b.word_order):
                continue
            r.errors.append(Problem(
                f"{r.path}.points[{jb}].address",
                f"{b.name} ({b.type} at {b.address}..{b.end - 1}) overlaps {a.name} ({a.type} at {a.address}..{a.end - 1}) "
                "and reads the same registers differently",
            ))


def check(buses: Sequence[Any], devices: Sequence[tuple[int, Any]], errors: list[Problem]) -> None:
    """Across the site: one unit id per bus (a second device on one unit would poll the same slave twice)."""
    units: dict[tuple[str, int], tuple[int, str]] = {}
    for i, device in devices:
        key = (device.bus, device.spec.unit)
        if key in units:
            j, other = units[key]
            errors.append(Problem(f"devices[{i}].unit", f"unit {device.spec.unit} on bus {device.bus!r} is already used by {other!r} (devices[{j}]); "
                                                         "to poll some of its points at another rate, give them a [[devices.groups]] entry"))
            continue
        units[key] = (i, device.name)


def requests_per_poll(device: Device) -> int:
    spec = device.spec
    return len(plan_requests(device.points, coalesce=spec.coalesce, max_gap=spec.max_gap, max_registers=spec.max_registers,
                             max_bits=spec.max_bits))


# ---------------------------------------------------------------------------------------------- runtime


@dataclass
class _Plan:
    """One device (or one group of its points), compiled: requests, per-point decoders, status gates."""

    points: tuple[int, ...]  # indexes in the device's point list, in result order
    requests: list[Request]
    split: set[int] = field(default_factory=set)  # requests the device rejected whole; read point by point
    decoders: list[Decoder] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    gates: list[tuple[int, tuple[tuple[int, bool], ...]]] = field(default_factory=list)


class ModbusDriver:
    def __init__(self, bus: Any, devices: Sequence[Device]) -> None:
        self.bus = bus
        self.transport = ModbusTransport(bus.name, bus.settings)
        self._plans: dict[tuple[str, tuple[int, ...]], _Plan] = {}

    def polled(self, device: Device) -> bool:
        return True

    def _plan(self, device: Device, group: tuple[int, ...]) -> _Plan:
        key = (device.name, group)
        plan = self._plans.get(key)
        if plan is None:
            spec = device.spec
            points = [device.points[i] for i in group]
            requests = plan_requests(points, coalesce=spec.coalesce, max_gap=spec.max_gap, max_registers=spec.max_registers,
                                     max_bits=spec.max_bits)
            plan = self._plans[key] = _Plan(group, requests, decoders=[compile_point(p) for p in points],
                                            counts=[p.count for p in points], gates=status_gates(points))
        return plan

    async def read(self, device: Device, link: Link, attempts: int, group: tuple[int, ...] | None = None) -> tuple[list[Result], bool]:
        plan = self._plan(device, group if group is not None else tuple(range(len(device.points))))
        points = [device.points[i] for i in plan.points]
        unit = device.spec.unit
        results: dict[int, Result] = {}
        answered = False
        for ri, req in enumerate(plan.requests):
            if ri not in plan.split:
                quality = await self._read(plan, req, unit, results, attempts, link)
                answered |= quality == Quality.GOOD or bool(quality & Quality.MODBUS_EXCEPTION)
                if not (quality in SPLIT_ON and len(req.members) > 1):
                    continue
                # The device refused a coalesced read (often a hole it does not map): split it for good.
                plan.split.add(ri)
                log.warning("%s: %s refused %d registers at %d (%s); reading those points one by one from now on",
                            self.bus.name, device.name, req.count, req.address, quality_name(quality))
            for j, _ in req.members:
                single = Request(req.table, points[j].address, points[j].count, ((j, 0),))
                quality = await self._read(plan, single, unit, results, attempts, link)
                answered |= quality == Quality.GOOD or bool(quality & Quality.MODBUS_EXCEPTION)
        if plan.gates:
            apply_status_gates(plan.gates, results)
        return [results[j] for j in range(len(points))], answered

    async def _read(self, plan: _Plan, req: Request, unit: int, results: dict[int, Result], attempts: int, link: Link) -> int:
        """Read one request into results. Returns GOOD, or the quality of the last failure. TransportError
        (the port or connection is gone) goes to the scheduler, which backs off."""
        quality: int = Quality.TIMEOUT
        for attempt in range(attempts):
            if attempt:
                await link.pause(min(0.05 * 2**attempt, 1.0))  # let a confused slave settle before retrying
            try:
                data = await link.transaction(lambda: self.transport.read(req.table, req.address, req.count, unit))
            except DeviceError as exc:
                quality = exc.quality
                if quality & Quality.MODBUS_EXCEPTION:
                    break  # a definite answer: retrying would get the same one
                continue
            decoders, counts = plan.decoders, plan.counts
            for j, off in req.members:
                results[j] = decoders[j](data[off : off + counts[j]])
            return Quality.GOOD
        for j, _ in req.members:
            results[j] = (None, quality)
        return quality

    async def run(self, deliver: Any, link: Link) -> None:
        raise NotImplementedError("Modbus devices are polled")

    async def write(self, kind: str, unit: int, address: int, value: int | bool, link: Link) -> None:
        if kind == "coil":
            await link.transaction(lambda: self.transport.write_coil(address, bool(value), unit))
        elif kind == "register":
            await link.transaction(lambda: self.transport.write_register(address, int(value), unit))
        else:
            raise ValueError(f"bus {self.bus.name}: cannot write a {kind!r}")

    def close(self) -> None:
        self.transport.close()


__all__ = ["KIND", "SAMPLE", "ModbusDriver", "ModbusDevice", "TransportError", "parse_bus", "parse_device", "check"]
