"""ADC channel with linear calibration: value = mean(read_u16) * scale + offset, exact decimal.

{"kind": "adc", "device": "crack", "point": "opening", "unit": "mm", "pin": 34,
 "scale": "0.0015", "offset": "-2.5", "samples": 8, "min": "0", "max": "95"}
"""

from . import Range
from ..dec import Linear


class AdcSensor:
    def __init__(self, f):
        self.device = f.text("device")
        self.pin = f.integer("pin", lo=0, hi=48)
        self.samples = f.integer("samples", 4, 1, 64)
        self.lin = Linear(f.decimal("scale", (1, 0)), f.decimal("offset", (0, 0)))
        self.range = Range(f)
        self.points = [(self.device, f.text("point", "value"), f.text("unit", ""), "uint16")]
        self.adc = None
        self.base = 0

    def open(self, board, base):
        self.adc = board.adc(self.pin)
        self.base = base

    def read(self, batch, ts):
        n = self.samples
        total = 0
        for _ in range(n):
            total += self.adc.read_u16()
        raw = (total + n // 2) // n
        self.range.add(batch, self.base, ts, self.lin.mantissa(raw), self.lin.exp)
