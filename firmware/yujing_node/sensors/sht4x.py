"""Sensirion SHT4x temperature and humidity over I2C (datasheet SHT4x v6.6, section 4).

    {"kind": "sht4x", "device": "env", "i2c": {"id": 0, "scl": 22, "sda": 21}, "address": 68}

One measurement: write command 0xFD (high repeatability), wait 10 ms, read 6 bytes
[T msb, T lsb, CRC, RH msb, RH lsb, CRC]; CRC-8 polynomial 0x31, init 0xFF. Conversion on
integers, in hundredths: T = -45 + 175 * St / 65535 degC, RH = -6 + 125 * Srh / 65535 %RH
(clamped to 0..100), so values are exact decimals with exponent -2.
"""

from . import Range
from ..records import DEC, NULL

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_CMD_MEASURE_HIGH = const(0xFD)
_WAIT_MS = const(10)
_TIMEOUT = const(1)
_FRAMING = const(2)


def crc8(buf, start, end):
    crc = 0xFF
    for i in range(start, end):
        crc ^= buf[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def centi_celsius(raw):
    return -4500 + (17500 * raw + 32767) // 65535


def centi_rh(raw):
    v = -600 + (12500 * raw + 32767) // 65535
    return 0 if v < 0 else (10000 if v > 10000 else v)


class Sht4xSensor:
    def __init__(self, f):
        self.device = f.text("device")
        i = f.obj("i2c")
        self.bus = (
            i.integer("id", 0, 0, 1),
            i.integer("scl"),
            i.integer("sda"),
            i.integer("freq", 100000, 10000, 1000000),
        )
        i.done()
        self.address = f.integer("address", 0x44, 0x08, 0x77)
        self.t_range = Range(f)  # min/max apply to temperature
        self.points = [(self.device, "temperature", "Cel", "uint16"), (self.device, "humidity", "%RH", "uint16")]
        self.i2c = None
        self.clock = None
        self.base = 0
        self.cmd = bytearray((_CMD_MEASURE_HIGH,))
        self.buf = bytearray(6)

    def open(self, board, base):
        self.i2c = board.i2c(*self.bus)
        self.clock = board.clock
        self.base = base

    def read(self, batch, ts):
        p = self.base
        buf = self.buf
        try:
            self.i2c.writeto(self.address, self.cmd)
            self.clock.sleep_ms(_WAIT_MS)
            self.i2c.readfrom_into(self.address, buf)
        except OSError:  # no ACK: absent, unpowered or bus stuck
            batch.add(p, ts, NULL, 0, 0, _TIMEOUT)
            batch.add(p + 1, ts, NULL, 0, 0, _TIMEOUT)
            return
        if crc8(buf, 0, 2) != buf[2]:
            batch.add(p, ts, NULL, 0, 0, _FRAMING)
        else:
            self.t_range.add(batch, p, ts, centi_celsius(buf[0] << 8 | buf[1]), -2)
        if crc8(buf, 3, 5) != buf[5]:
            batch.add(p + 1, ts, NULL, 0, 0, _FRAMING)
        else:
            batch.add(p + 1, ts, DEC, -2, centi_rh(buf[3] << 8 | buf[4]), 0)
