"""A simulated board for running the firmware without hardware, under real MicroPython (the
WebAssembly port, via run.mjs) and under CPython (the MQTT tests against mosquitto).

It replaces only firmware/yujing_node/hw.py's Board, the layer that has no real part on a
host: pins, ADC, I2C with a simulated SHT4x, a UART with a simulated Modbus RTU slave, RTC
memory, watchdog, deep sleep and reset cause. Time is virtual (sleep_ms advances it at once),
so an hour of cycles runs in milliseconds. Files go to the real filesystem under `root`.
Network: under CPython, connect() opens a real TCP socket; under MicroPython (no sockets in the
WebAssembly port) it talks to SimBroker, an in-memory stand-in for an MQTT broker.
"""

import struct

try:
    import socket as _socket
except ImportError:
    _socket = None

EPOCH_2026 = 1767225600000  # 2026-01-01T00:00:00Z in ms


class SimDeepSleep(Exception):
    """Raised by deepsleep(): the test 'wakes' the board by building a new Node on it."""

    def __init__(self, ms, wake_pin):
        super().__init__(ms)
        self.ms = ms
        self.wake_pin = wake_pin


class SimReset(Exception):
    pass


class SimClock:
    def __init__(self, epoch_ms=EPOCH_2026):
        self.now = epoch_ms
        self.slept = 0

    def epoch_ms(self):
        return self.now

    def valid(self):
        return True

    def ticks_ms(self):
        return self.now & 0x3FFFFFFF

    def ticks_add(self, t, d):
        return (t + d) & 0x3FFFFFFF

    def ticks_diff(self, a, b):
        d = (a - b) & 0x3FFFFFFF
        return d - 0x40000000 if d & 0x20000000 else d

    def sleep_ms(self, ms):
        self.now += ms
        self.slept += ms


class SimPin:
    def __init__(self, n):
        self.n = n
        self.state = 0
        self.history = []

    def on(self):
        self.state = 1
        self.history.append(1)

    def off(self):
        self.state = 0
        self.history.append(0)


class SimAdc:
    def __init__(self):
        self.value = 0
        self.reads = 0

    def read_u16(self):
        self.reads += 1
        return self.value


def sht_crc(b0, b1):
    crc = 0xFF
    for b in (b0, b1):
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SimSht4x:
    """An SHT4x on the simulated bus: raw words, and faults to inject."""

    def __init__(self, t_raw=0x6666, rh_raw=0x8000):
        self.t_raw = t_raw
        self.rh_raw = rh_raw
        self.absent = False
        self.corrupt_t = False
        self.last_cmd = None

    def frame(self):
        t0, t1, h0, h1 = self.t_raw >> 8, self.t_raw & 0xFF, self.rh_raw >> 8, self.rh_raw & 0xFF
        ct = sht_crc(t0, t1) ^ (0x01 if self.corrupt_t else 0)
        return bytes((t0, t1, ct, h0, h1, sht_crc(h0, h1)))


class SimI2C:
    def __init__(self):
        self.devices = {}

    def writeto(self, addr, buf):
        dev = self.devices.get(addr)
        if dev is None or dev.absent:
            raise OSError(19)  # ENODEV: no ACK
        dev.last_cmd = bytes(buf)
        return len(buf)

    def readfrom_into(self, addr, buf):
        dev = self.devices.get(addr)
        if dev is None or dev.absent:
            raise OSError(19)
        buf[:] = dev.frame()


def crc16(data):
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


class SimModbusSlave:
    """Answers FC 3/4 from `regs` ({address: uint16}). fault: None, "silent", "bad_crc", "short",
    "wrong_unit" or an exception code (int)."""

    def __init__(self, unit=1):
        self.unit = unit
        self.regs = {}
        self.fault = None
        self.requests = []

    def answer(self, req):
        self.requests.append(bytes(req))
        if len(req) != 8 or crc16(req[:6]) != req[6] | req[7] << 8 or req[0] != self.unit:
            return b""
        fn, first, count = req[1], req[2] << 8 | req[3], req[4] << 8 | req[5]
        if self.fault == "silent":
            return b""
        if isinstance(self.fault, int):
            body = bytes((self.unit, fn | 0x80, self.fault))
        else:
            data = bytearray()
            for a in range(first, first + count):
                if a not in self.regs:
                    body = bytes((self.unit, fn | 0x80, 2))
                    break
                v = self.regs[a]
                data.append(v >> 8)
                data.append(v & 0xFF)
            else:
                body = bytes((self.unit if self.fault != "wrong_unit" else self.unit + 1, fn, len(data))) + bytes(data)
        c = crc16(body)
        frame = body + bytes((c & 0xFF, c >> 8))
        if self.fault == "bad_crc":
            frame = frame[:-1] + bytes((frame[-1] ^ 0xFF,))
        if self.fault == "short":
            frame = frame[:-3]
        return frame


class SimUart:
    def __init__(self, slave=None):
        self.slave = slave
        self.rx = bytearray()
        self.flushes = 0

    def write(self, buf):
        if self.slave is not None:
            self.rx.extend(self.slave.answer(bytes(buf)))
        return len(buf)

    def flush(self):
        self.flushes += 1

    def any(self):
        return len(self.rx)

    def readinto(self, buf):
        n = min(len(buf), len(self.rx))
        if not n:
            return None
        buf[:n] = self.rx[:n]
        self.rx = self.rx[n:]
        return n


class SimWdt:
    def __init__(self, clock, timeout_ms):
        self.clock = clock
        self.timeout_ms = timeout_ms
        self.last = clock.now
        self.longest = 0
        self.feeds = 0

    def feed(self):
        gap = self.clock.now - self.last
        if gap > self.longest:
            self.longest = gap
        self.last = self.clock.now
        self.feeds += 1


class SimBroker:
    """In-memory MQTT 3.1.1 broker for one client (MicroPython has no sockets here).
    Records every PUBLISH as (topic, payload bytes, qos, retain); drop() loses the link and
    'sends' the will like a broker would."""

    def __init__(self):
        self.published = []
        self.wills = []
        self.connects = 0
        self.refuse = 0  # CONNACK return code to answer with
        self.ack = True  # False: swallow PUBACKs
        self.stream = None

    def open(self):
        self.stream = _BrokerStream(self)
        return self.stream

    def drop(self):
        s = self.stream
        if s is not None and not s.closed:
            s.closed = True
            if s.will is not None and not s.clean:
                self.wills.append(s.will)
                self.published.append(s.will)


class _BrokerStream:
    def __init__(self, broker):
        self.broker = broker
        self.inbuf = bytearray()
        self.out = bytearray()
        self.closed = False
        self.clean = False
        self.will = None

    def settimeout(self, t):
        pass

    def close(self):
        if not self.closed:
            self.broker.drop()
        self.closed = True

    def readinto(self, buf):
        if self.closed:
            raise OSError(104)  # ECONNRESET
        n = min(len(buf), len(self.out))
        if not n:
            return None
        buf[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def write(self, buf):
        if self.closed:
            raise OSError(104)
        self.inbuf.extend(buf)
        while self._packet():
            pass
        return len(buf)

    def _packet(self):
        b = self.inbuf
        if len(b) < 2:
            return False
        n, shift, i = 0, 0, 1
        while True:
            if i >= len(b):
                return False
            n |= (b[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not b[i - 1] & 0x80:
                break
        if len(b) < i + n:
            return False
        ptype, body = b[0], bytes(b[i : i + n])
        self.inbuf = b[i + n :]
        self._handle(ptype, body)
        return True

    def _handle(self, ptype, body):
        t = ptype & 0xF0
        br = self.broker
        if t == 0x10:
            br.connects += 1
            flags = body[7]
            i = 10
            ln = body[i] << 8 | body[i + 1]
            i += 2 + ln
            if flags & 0x04:
                tl = body[i] << 8 | body[i + 1]
                topic = body[i + 2 : i + 2 + tl]
                i += 2 + tl
                pl = body[i] << 8 | body[i + 1]
                self.will = (topic, body[i + 2 : i + 2 + pl], (flags >> 3) & 3, bool(flags & 0x20))
            self.out.extend(bytes((0x20, 2, 0, br.refuse)))
        elif t == 0x30:
            qos = (ptype >> 1) & 3
            tl = body[0] << 8 | body[1]
            topic = body[2 : 2 + tl]
            i = 2 + tl
            pid = 0
            if qos:
                pid = body[i] << 8 | body[i + 1]
                i += 2
            br.published.append((topic, body[i:], qos, bool(ptype & 1)))
            if qos == 1 and br.ack:
                self.out.extend(bytes((0x40, 2, pid >> 8, pid & 0xFF)))
        elif t == 0x80:
            self.out.extend(bytes((0x90, 3, body[0], body[1], body[-1])))
        elif t == 0xC0:
            self.out.extend(bytes((0xD0, 0)))
        elif t == 0xE0:
            self.clean = True
            self.closed = True


class _SockStream:
    """CPython socket -> the stream the MQTT client expects (write/readinto/settimeout/close)."""

    def __init__(self, sock):
        self.sock = sock

    def write(self, buf):
        self.sock.sendall(buf)
        return len(buf)

    def readinto(self, buf):
        try:
            return self.sock.recv_into(buf)
        except (BlockingIOError, _socket.timeout):
            return None

    def settimeout(self, t):
        self.sock.settimeout(t)

    def close(self):
        self.sock.close()

    def kill(self):
        """Drop the TCP connection without DISCONNECT: the broker must send the will."""
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class SimBoard:
    def __init__(self, root="", clock=None, broker=None, status_led=2):
        self.root = root.rstrip("/")
        self.clock = clock or SimClock()
        self.status_led = status_led
        self.broker = broker
        self.logs = []
        self.quiet = False
        self.pins = {}
        self.adcs = {}
        self.i2c_bus = SimI2C()
        self.uarts = {}
        self.slaves = {}
        self.irqs = {}
        self.rtc = None
        self.cause = "cold"
        self.net_ok = True
        self.net_attempts = 0
        self.dogs = []
        self.sleeps = []
        self.resets = 0
        self.socks = []
        self.held = ()

    def path(self, p):
        return self.root + p

    def log(self, msg):
        self.logs.append(msg)
        if not self.quiet:
            print(msg)

    def collect(self):
        import gc

        gc.collect()

    def pin_out(self, n, active_low=False):
        """Like hw.Board.pin_out: the output starts off."""
        if n not in self.pins:
            self.pins[n] = SimPin(n)
            self.pins[n].off()
        return self.pins[n]

    def adc(self, n):
        if n not in self.adcs:
            self.adcs[n] = SimAdc()
        return self.adcs[n]

    def pulse_in(self, n, pull, edge, handler):
        self.irqs[n] = handler

    def pulse(self, n, count=1, gap_ms=100):
        """Pulses on input pin n, gap_ms apart (virtual time advances)."""
        for _ in range(count):
            self.clock.sleep_ms(gap_ms)
            self.irqs[n](n)

    def i2c(self, bus, scl, sda, freq):
        return self.i2c_bus

    def uart(self, n, tx, rx, baud, parity, stop):
        if n not in self.uarts:
            self.uarts[n] = SimUart(self.slaves.get(n))
        return self.uarts[n]

    def disable_irq(self):
        return 0

    def enable_irq(self, state):
        pass

    def wdt(self, timeout_ms):
        d = SimWdt(self.clock, timeout_ms)
        self.dogs.append(d)
        return d

    def rtc_read(self):
        return None if self.rtc is None else bytes(self.rtc)

    def rtc_write(self, buf):
        if len(buf) > 2048:
            return False
        self.rtc = bytes(buf)
        return True

    def reset_cause(self):
        return self.cause

    def deepsleep(self, ms, wake_pin=None, hold=()):
        self.held = tuple(hold)
        self.sleeps.append((self.clock.now, ms, wake_pin))
        raise SimDeepSleep(ms, wake_pin)

    def wake(self, ms=None, cause="sleep"):
        """After SimDeepSleep: advance the clock by the sleep (or ms) and set the reset cause."""
        self.clock.now += self.sleeps[-1][1] if ms is None else ms
        self.cause = cause

    def reset(self):
        self.resets += 1
        raise SimReset()

    def net_up(self, net, secrets, feed):
        self.net_attempts += 1
        feed()
        return self.net_ok

    def connect(self, host, port, timeout_ms):
        if _socket is not None and self.broker is None:
            s = _socket.create_connection((host, port), timeout_ms / 1000)
            st = _SockStream(s)
            self.socks.append(st)
            return st
        if self.broker is None or not self.net_ok:
            raise OSError(111)  # ECONNREFUSED
        return self.broker.open()


def u16(v):
    return struct.unpack("<H", struct.pack("<h", v))[0] if v < 0 else v
