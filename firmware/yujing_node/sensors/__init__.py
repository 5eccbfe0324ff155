"""Sensor drivers. A driver is one module with one class:

    cls(fields)         validate its config block (a config.Fields); no I/O. Sets `points`,
                        a list of (device, point, unit, type) for the birth catalogue.
    open(board, base)   acquire its hardware from the board; `base` is the catalogue index of its
                        first point.
    read(batch, ts)     append exactly one reading per point to the batch. A device fault is a
                        reading with a quality code (1 timeout, 2 framing, 3 decode,
                        4 out_of_range, 0x80|n Modbus exception), never an exception.
    state() / resume(n) optional: an integer kept across deep sleep (the pulse count).

Only the drivers a configuration names are imported, so unused ones cost no RAM.
"""

from ..dec import cmp
from ..records import DEC

KINDS = ("adc", "pulse", "sht4x", "modbus")
OUT_OF_RANGE = 4


def parse(f):
    kind = f.choice("kind", KINDS)
    if kind == "adc":
        from .adc import AdcSensor as cls
    elif kind == "pulse":
        from .pulse import PulseSensor as cls
    elif kind == "sht4x":
        from .sht4x import Sht4xSensor as cls
    else:
        from .modbus import ModbusSensor as cls
    s = cls(f)
    f.done()
    return s


class Range:
    """A point's optional min/max (decimals): out of range is quality 4, the value is still sent."""

    def __init__(self, f):
        self.lo = f.decimal("min", None)
        self.hi = f.decimal("max", None)

    def add(self, batch, point, ts, m, e):
        """Append the decimal reading m * 10**e with quality 4 when outside min..max."""
        q = 0
        lo, hi = self.lo, self.hi
        if (lo is not None and cmp(m, e, lo[0], lo[1]) < 0) or (hi is not None and cmp(m, e, hi[0], hi[1]) > 0):
            q = OUT_OF_RANGE
        batch.add(point, ts, DEC, e, m, q)

    def quality_f(self, v):
        """The same check for a float reading (float32 registers)."""
        lo, hi = self.lo, self.hi
        if (lo is not None and v < lo[0] * 10.0 ** lo[1]) or (hi is not None and v > hi[0] * 10.0 ** hi[1]):
            return OUT_OF_RANGE
        return 0
