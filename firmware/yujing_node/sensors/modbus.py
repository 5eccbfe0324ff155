"""Modbus RTU master on the node's UART (RS-485), for one sensor with a few registers.

    {"kind": "modbus", "device": "gas", "unit_id": 1, "timeout_ms": 500,
     "uart": {"id": 2, "tx": 17, "rx": 16, "baud": 9600, "parity": "none", "stop": 1, "de": 5},
     "points": [{"name": "ch4", "unit": "%LEL", "address": 1, "function": 3, "type": "uint16",
                 "scale": "0.1", "max": "100"}]}

Points sharing a function code are read with one request covering their span (at most 125
registers). Integer registers become exact decimals (raw * scale + offset); float32 registers
are sent as floats (NaN or infinity: quality 3). No answer is quality 1; a short frame, a CRC
error or a wrong unit/function is quality 2; an exception response n is 0x80 | n.
"""

import struct

from . import Range
from ..config import uart_fields
from ..dec import Linear
from ..records import FLOAT, NULL

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_TIMEOUT = const(1)
_FRAMING = const(2)
_DECODE = const(3)
_MAX_REGS = const(125)
_WIDTH = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}


def crc16(buf, n):
    """Modbus CRC-16 (polynomial 0xA001 reflected, init 0xFFFF) of buf[:n]."""
    crc = 0xFFFF
    for i in range(n):
        crc ^= buf[i]
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


class _Point:
    def __init__(self, f):
        self.name = f.text("name")
        self.unit = f.text("unit", "")
        self.address = f.integer("address", lo=0, hi=65535)
        self.function = f.integer("function", 3, 3, 4)
        self.type = f.choice("type", tuple(_WIDTH), "uint16")
        self.low_word_first = f.choice("word_order", ("big", "little"), "big") == "little"
        scale = f.decimal("scale", (1, 0))
        offset = f.decimal("offset", (0, 0))
        if self.type == "float32" and (scale != (1, 0) or offset != (0, 0)):
            raise f.error("scale", "float32 registers are sent as read: no scale or offset")
        self.lin = Linear(scale, offset)
        self.range = Range(f)
        f.done()


class ModbusSensor:
    def __init__(self, f):
        self.device = f.text("device")
        self.uart_cfg = uart_fields(f.obj("uart"))
        self.unit_id = f.integer("unit_id", 1, 1, 247)
        self.timeout_ms = f.integer("timeout_ms", 500, 10, 10000)
        self.pts = [_Point(p) for p in f.items("points")]
        if not self.pts:
            raise f.error("points", "no point configured")
        self.points = [(self.device, p.name, p.unit, p.type) for p in self.pts]
        self.reqs = []  # (function, first register, count, [point numbers])
        longest = 0
        for fn in (3, 4):
            idx = [i for i, p in enumerate(self.pts) if p.function == fn]
            if not idx:
                continue
            lo = min(self.pts[i].address for i in idx)
            hi = max(self.pts[i].address + _WIDTH[self.pts[i].type] for i in idx)
            if hi - lo > _MAX_REGS:
                raise f.error(
                    "points", "function %d spans %d registers; one request reads at most %d" % (fn, hi - lo, _MAX_REGS)
                )
            self.reqs.append((fn, lo, hi - lo, idx))
            longest = max(longest, hi - lo)
        self.tx = bytearray(8)
        self.rx = bytearray(5 + 2 * longest)
        self.rxv = memoryview(self.rx)
        self.uart = None
        self.de = None
        self.clock = None
        self.base = 0

    def open(self, board, base):
        u = self.uart_cfg
        self.uart = board.uart(u["id"], u["tx"], u["rx"], u["baud"], u["parity"], u["stop"])
        self.de = board.pin_out(u["de"], False) if u["de"] is not None else None
        self.clock = board.clock
        self.base = base

    def transact(self, fn, first, count):
        """One request/response; 0 when rx holds a valid answer, else the quality code."""
        tx = self.tx
        tx[0] = self.unit_id
        tx[1] = fn
        tx[2] = first >> 8
        tx[3] = first & 0xFF
        tx[4] = count >> 8
        tx[5] = count & 0xFF
        crc = crc16(tx, 6)
        tx[6] = crc & 0xFF
        tx[7] = crc >> 8
        uart = self.uart
        while uart.any():  # stale bytes from an earlier, late answer
            uart.readinto(self.rxv)
        if self.de is not None:
            self.de.on()
        uart.write(tx)
        uart.flush()  # returns when the last stop bit has left
        if self.de is not None:
            self.de.off()
        clock = self.clock
        deadline = clock.ticks_add(clock.ticks_ms(), self.timeout_ms)
        want = 5 + 2 * count
        got = 0
        rx = self.rx
        while got < want and clock.ticks_diff(deadline, clock.ticks_ms()) > 0:
            n = uart.readinto(self.rxv[got:want])
            if n:
                got += n
                if got >= 2 and rx[1] & 0x80:
                    want = 5  # exception response
            else:
                clock.sleep_ms(1)
        if got == 0:
            return _TIMEOUT
        if got < want or crc16(rx, want - 2) != rx[want - 2] | rx[want - 1] << 8:
            return _FRAMING
        if rx[0] != self.unit_id or rx[1] & 0x7F != fn:
            return _FRAMING
        if rx[1] & 0x80:
            return 0x80 | (rx[2] & 0x7F)
        if rx[2] != 2 * count:
            return _FRAMING
        return 0

    def read(self, batch, ts):
        for fn, first, count, idx in self.reqs:
            status = self.transact(fn, first, count)
            for i in idx:
                p = self.pts[i]
                point = self.base + i
                if status:
                    batch.add(point, ts, NULL, 0, 0, status)
                    continue
                off = 3 + 2 * (p.address - first)
                rx = self.rx
                if _WIDTH[p.type] == 1:
                    raw = rx[off] << 8 | rx[off + 1]
                    if p.type == "int16" and raw & 0x8000:
                        raw -= 0x10000
                else:
                    hi = rx[off] << 8 | rx[off + 1]
                    lo = rx[off + 2] << 8 | rx[off + 3]
                    if p.low_word_first:
                        hi, lo = lo, hi
                    raw = hi << 16 | lo
                    if p.type == "float32":
                        struct.pack_into(">I", self.tx, 0, raw)  # tx is free again: reuse as scratch
                        v = struct.unpack_from(">f", self.tx, 0)[0]
                        if v - v != 0:  # NaN or infinite
                            batch.add(point, ts, NULL, 0, 0, _DECODE)
                        else:
                            batch.add(point, ts, FLOAT, 0, v, p.range.quality_f(v))
                        continue
                    if p.type == "int32" and raw & 0x80000000:
                        raw -= 0x100000000
                p.range.add(batch, point, ts, p.lin.mantissa(raw), p.lin.exp)
