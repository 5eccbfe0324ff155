"""Fake `machine` for the MicroPython unix port: only the silicon an ESP32 has and a host has not.

hw.Board (firmware/yujing_node/hw.py) uses it unchanged. Pins keep a level and report output changes on
the console (`SIM pin 4 1`); ADC pins read the number in <sim>/adc<N>; I2C has no devices (ENODEV) and
UARTs no peer (reads return None) — the sensors that need them are tested on the wasm/CPython simulated
board; RTC memory lives in <sim>/rtc.bin; deepsleep() and reset() end the process (exit 0 and 3) after
recording the cause the next start reports, so a supervisor that restarts the process plays the reboot.
The watchdog records its timeout and feeds but never fires (no timer interrupt to fire from here).
"""

import sys
import time

import _sim

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
PIN_WAKE = 2
EXT0_WAKE = 2
EXT1_WAKE = 3
TIMER_WAKE = 4

_CAUSES = {"deepsleep": DEEPSLEEP_RESET, "pin": DEEPSLEEP_RESET, "soft": SOFT_RESET, "wdt": WDT_RESET}
_cause = None
_wake = TIMER_WAKE


def _start_cause():
    global _cause, _wake
    if _cause is None:
        c = (_sim.read("cause") or b"").decode().strip()
        _sim.remove("cause")
        _cause = _CAUSES.get(c, PWRON_RESET)
        _wake = PIN_WAKE if c == "pin" else TIMER_WAKE
    return _cause


def reset_cause():
    return _start_cause()


def wake_reason():
    _start_cause()
    return _wake


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, n, mode=-1, pull=-1, value=None, hold=None):
        self.n = n
        self.mode = mode
        self._v = 0 if value is None else value
        self.hold = hold

    def init(self, mode=-1, pull=-1, value=None, hold=None):
        if mode != -1:
            self.mode = mode
        if hold is not None:
            self.hold = hold

    def value(self, v=None):
        if v is None:
            return self._v
        v = 1 if v else 0
        if v != self._v:
            _sim.say("pin %d %d" % (self.n, v))
        self._v = v

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=IRQ_FALLING):
        self.handler = handler


class ADC:
    ATTN_0DB = 0
    ATTN_11DB = 3

    def __init__(self, pin, atten=None):
        self.pin = pin.n if isinstance(pin, Pin) else pin

    def atten(self, a):
        pass

    def read_u16(self):
        _sim.append("adc%d.log" % self.pin, b"%d\n" % (time.time_ns() // 1000000))
        raw = _sim.read("adc%d" % self.pin)
        return int(raw) if raw else 0


class I2C:
    def __init__(self, bus, scl=None, sda=None, freq=400000):
        self.bus = bus

    def writeto(self, addr, buf, stop=True):
        raise OSError(19)  # ENODEV: nothing answers on this bus

    def readfrom_into(self, addr, buf, stop=True):
        raise OSError(19)


class UART:
    def __init__(self, n, baudrate=9600, **kw):
        self.n = n

    def write(self, buf):
        return len(buf)

    def flush(self):
        pass

    def any(self):
        return 0

    def read(self, n=-1):
        return None

    def readinto(self, buf, n=-1):
        return None


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.feeds = 0

    def feed(self):
        self.feeds += 1


class RTC:
    def memory(self, data=None):
        if data is None:
            return _sim.read("rtc.bin", b"")
        _sim.write("rtc.bin", bytes(data))

    def datetime(self, dt=None):
        if dt is None:
            t = time.gmtime()
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0)


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


def deepsleep(ms=0):
    _sim.write("cause", b"deepsleep")
    _sim.say("deepsleep %d" % ms)
    sys.exit(0)


def lightsleep(ms=0):
    time.sleep_ms(ms)


def reset():
    _sim.write("cause", b"soft")
    _sim.say("reset")
    sys.exit(3)


def freq(hz=None):
    return 240000000


def unique_id():
    return b"\x24\x0a\xc4\x00\x00\x07"
