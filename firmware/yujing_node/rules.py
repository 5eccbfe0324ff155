"""Local threshold alarms, the gateway's `threshold` rule semantics (gateway/rules/threshold.py,
common.py `ladder`, core.py `AlarmCore`) without time-based delays, windows or stale checks.

Runs on every sample before anything touches the network, so a buzzer or beacon works with the
uplink down. Per rule (config.Rule):

- levels: IV blue (1) .. I red (4), a ladder of rungs `set`/`clear`. The condition level is the
  highest rung the value supports: value >= set, or, for a rung at or below the current level,
  value >= clear (hysteresis); mirrored (<=) for direction "low";
- a level is entered once the condition has been at or above it for `on_delay_count`
  consecutive readings (escalating through several levels is one step), and left once it has
  been below it for `off_delay_count` readings;
- a reading with bad quality, or without a value, is a fault: the level stays, partly counted
  delays are forgotten; the next good reading clears the fault. Faults are not levels. With
  `out_of_range = "raise_only"` an out_of_range reading is still evaluated, but may only raise
  or hold a level (fail-safe for an over-range gas head); one that supports no level is a fault.

- `latch`: the shown level holds the highest level reached until acknowledged (`acknowledge`, the "ack"
  command); the condition keeps being tracked underneath (`cond`), as the gateway's AlarmCore does.

Every change of a shown level, every fault and fault clearing and every acknowledgement is appended to
`events` as (kind, rule index, old level, new level, batch index of the reading or -1, by): the node
publishes them as alarm messages (wire.encode_alarm) and clears the list.

Decimal values are compared exactly with the decimal set/clear values; float values (float32
registers) with those values converted to float.
"""

from .dec import cmp
from .records import FALSE, FLOAT, NULL, TRUE

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_OUT_OF_RANGE = const(4)
STATE_BYTES = const(12)
MAX_EVENTS = const(16)  # events held between two publishes; beyond, the oldest goes (and is counted)
# event kinds, wire order (gateway/wire.py EVENT_KINDS)
RAISED = const(0)
ESCALATED = const(1)
DE_ESCALATED = const(2)
CLEARED = const(3)
ACKNOWLEDGED = const(4)
FAULT = const(5)
FAULT_CLEARED = const(6)


class Alarms:
    def __init__(self, rules, output=None, on_level=1):
        self.rules = rules
        self.output = output  # an object with on()/off(), or None
        self.on_level = on_level
        n = len(rules)
        self.level = bytearray(n)  # what the alarm shows (a latch holds it until acknowledged)
        self.cond = bytearray(n)  # the confirmed condition level (the gateway's AlarmCore.active)
        self.acked = bytearray(n)
        self.fault = bytearray(n)
        self.events = []
        self.lost_events = 0
        self._at = -1  # batch index of the reading being evaluated, for events
        self._up = [bytearray(5) for _ in range(n)]  # per level 1..4: consecutive readings at/above it
        self._down = [bytearray(5) for _ in range(n)]  # ... and below it
        self.active = False

    # ------------------------------------------------------------ one rule

    def _supports(self, r, t, kind, m, e, f):
        """Whether the value is at or beyond threshold t = (mantissa, exponent, float)."""
        if kind == FLOAT:
            return f >= t[2] if r.high else f <= t[2]
        c = cmp(m, e, t[0], t[1])
        return c >= 0 if r.high else c <= 0

    def condition(self, k, kind, m, e, f):
        """The level the value supports given the current level (gateway `ladder`)."""
        r = self.rules[k]
        active = self.cond[k]
        best = 0
        for lv, set_, clear in r.levels:
            if lv <= best:
                continue
            if self._supports(r, set_, kind, m, e, f) or (lv <= active and self._supports(r, clear, kind, m, e, f)):
                best = lv
        return best

    def _observe(self, k, cond):
        up, down = self._up[k], self._down[k]
        for lv in (1, 2, 3, 4):
            if cond >= lv:
                if up[lv] < 255:
                    up[lv] += 1
                down[lv] = 0
            else:
                if down[lv] < 255:
                    down[lv] += 1
                up[lv] = 0
        r = self.rules[k]
        active = self.cond[k]
        target = active
        for lv in range(4, active, -1):
            if up[lv] >= r.on_delay:
                target = lv
                break
        if target == active:
            while target > 0 and down[target] >= r.off_delay:
                target -= 1
        if target != active:
            self._confirm(k, target)

    def _confirm(self, k, new_active):
        old = self.level[k]
        self.cond[k] = new_active
        if new_active > old:
            new = new_active
            self.acked[k] = 0
        elif self.rules[k].latch and not self.acked[k]:
            new = old  # held until acknowledged
        else:
            new = new_active
        if new != old:
            self._change(k, old, new)

    def _change(self, k, old, new, by=None):
        self.level[k] = new
        if new == 0:
            self.acked[k] = 0
        kind = RAISED if old == 0 else (CLEARED if new == 0 else (ESCALATED if new > old else DE_ESCALATED))
        self._event(kind, k, old, new, by)

    def _event(self, kind, k, old, new, by=None):
        if len(self.events) >= MAX_EVENTS:
            self.events.pop(0)
            self.lost_events += 1
        self.events.append((kind, k, old, new, self._at, by))

    def acknowledge(self, k, by):
        """The operator saw it: False when there is nothing to acknowledge (no level, or already acked).
        A latched level whose condition has dropped is released to the condition's level at once."""
        level = self.level[k]
        if level == 0 or self.acked[k]:
            return False
        self.acked[k] = 1
        self._at = -1
        self._event(ACKNOWLEDGED, k, level, level, by)
        if self.cond[k] < level:
            self._change(k, level, self.cond[k], by)
        self.drive(max(self.level))
        return True

    def _fault_on(self, k):
        if not self.fault[k]:
            self._event(FAULT, k, self.level[k], self.level[k])
        self.fault[k] = 1
        up, down = self._up[k], self._down[k]
        for lv in range(5):
            up[lv] = 0
            down[lv] = 0

    def step(self, k, kind, m=0, e=0, f=0.0, quality=0):
        """Feed rule k one reading of its point; returns its level afterwards."""
        r = self.rules[k]
        if kind == TRUE or kind == FALSE:
            m, e = (1 if kind == TRUE else 0), 0
        if quality == _OUT_OF_RANGE and r.raise_only and kind != NULL:
            cond = self.condition(k, kind, m, e, f)
            if cond >= self.cond[k] and cond > 0:  # supporting no level at all: a broken loop, a fault
                self._observe(k, cond)
            else:
                self._fault_on(k)
        elif quality or kind == NULL:
            self._fault_on(k)
        else:
            self._clear_fault(k)
            self._observe(k, self.condition(k, kind, m, e, f))
        return self.level[k]

    def _clear_fault(self, k):
        if self.fault[k]:
            self.fault[k] = 0
            self._event(FAULT_CLEARED, k, self.level[k], self.level[k])

    # ------------------------------------------------------------ all rules

    def evaluate(self, batch):
        """Run every rule over the batch's readings, then set the output. Returns the highest level."""
        rules = self.rules
        for i in range(batch.n):
            p = batch.point(i)
            for k in range(len(rules)):
                if rules[k].point == p:
                    self._at = i
                    kind = batch.kind(i)
                    if kind == FLOAT:
                        self.step(k, kind, 0, 0, batch.fval(i), batch.quality(i))
                    else:
                        self.step(k, kind, batch.ival(i), batch.exp(i), 0.0, batch.quality(i))
        self._at = -1
        top = max(self.level) if self.level else 0
        self.drive(top)
        return top

    def drive(self, top):
        on = top >= self.on_level
        self.active = on
        if self.output is not None:
            if on:
                self.output.on()
            else:
                self.output.off()

    def save(self, buf):
        """The rules' state (level, fault, delay counts, condition level, acked: STATE_BYTES per rule) into buf,
        for RTC memory:
        a sleeping node takes one reading per wake, so the counts must survive deep sleep."""
        for k in range(len(self.rules)):
            o = k * STATE_BYTES
            buf[o] = self.level[k]
            buf[o + 1] = self.fault[k]
            buf[o + 2 : o + 6] = memoryview(self._up[k])[1:]
            buf[o + 6 : o + 10] = memoryview(self._down[k])[1:]
            buf[o + 10] = self.cond[k]
            buf[o + 11] = self.acked[k]

    def restore(self, buf):
        for k in range(min(len(buf) // STATE_BYTES, len(self.rules))):
            o = k * STATE_BYTES
            self.level[k] = min(buf[o], 4)
            self.fault[k] = buf[o + 1]
            self._up[k][1:] = buf[o + 2 : o + 6]
            self._down[k][1:] = buf[o + 6 : o + 10]
            self.cond[k] = min(buf[o + 10], 4)
            if not self.rules[k].latch or self.cond[k] > self.level[k]:
                self.cond[k] = self.level[k]
            self.acked[k] = buf[o + 11] if self.level[k] else 0
        self.drive(max(self.level) if self.level else 0)
