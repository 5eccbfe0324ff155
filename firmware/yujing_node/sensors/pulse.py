"""Pulse counter for a tipping-bucket rain gauge: the value is the rain since the last sample.

    {"kind": "pulse", "device": "rain", "point": "rain", "unit": "mm", "pin": 27,
     "per_pulse": "0.2", "debounce_ms": 50, "pull": "up", "edge": "falling"}

The count lives in the interrupt handler's integer; state()/resume() carry it across deep sleep,
and a node that sleeps wakes on this pin (the board counts the tip that woke it).
"""

from . import Range


class PulseSensor:
    def __init__(self, f):
        self.device = f.text("device")
        self.pin = f.integer("pin", lo=0, hi=48)
        self.per_pulse = f.decimal("per_pulse", (1, 0))
        self.debounce_ms = f.integer("debounce_ms", 50, 0, 10000)
        self.pull = f.choice("pull", ("up", "down", "none"), "up")
        self.edge = f.choice("edge", ("falling", "rising"), "falling")
        self.range = Range(f)
        self.points = [(self.device, f.text("point", "rain"), f.text("unit", "mm"), "uint32")]
        self.count = 0
        self.base = 0
        self._last = 0
        self._clock = None
        self._board = None

    def open(self, board, base):
        self.base = base
        self._board = board
        self._clock = board.clock
        self._last = self._clock.ticks_ms()
        board.pulse_in(self.pin, self.pull, self.edge, self._irq)

    def _irq(self, _pin):
        """Runs in the pin interrupt: no allocation beyond small-int arithmetic."""
        now = self._clock.ticks_ms()
        if self._clock.ticks_diff(now, self._last) >= self.debounce_ms:
            self.count += 1
            self._last = now

    def tip(self):
        """A pulse that woke the board from deep sleep (the interrupt was not running)."""
        self.count += 1

    def state(self):
        return self.count

    def resume(self, n):
        self.count = n

    def read(self, batch, ts):
        irq = self._board.disable_irq()
        n = self.count
        self.count = 0
        self._board.enable_irq(irq)
        m, e = self.per_pulse
        self.range.add(batch, self.base, ts, n * m, e)
