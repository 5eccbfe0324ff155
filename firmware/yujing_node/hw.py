"""The thin hardware layer for an ESP32 running MicroPython: the only module that touches
machine, network, socket, ssl, esp32 and ntptime. Everything else receives a board and calls the
methods below, so the host tests can pass a simulated board (firmware/host/sim/simboard.py)
that has exactly these methods.

Nothing is created at import; each method makes what it is asked for.
"""

import gc
import time

_EPOCH_2000 = 946684800  # seconds from 1970 to 2000: the ESP32 port's time epoch
_RTC_MAX = 2048  # bytes of RTC user memory on the ESP32 port


class Clock:
    """Epoch milliseconds (UTC, 1970 epoch as on the wire) and the monotonic tick helpers."""

    def __init__(self):
        self._offset_s = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0

    def epoch_ms(self):
        return time.time_ns() // 1000000 + self._offset_s * 1000

    def valid(self):
        """False until the RTC has been set (NTP): the year would still be 2000."""
        return time.gmtime()[0] >= 2024

    def ticks_ms(self):
        return time.ticks_ms()

    def ticks_add(self, t, d):
        return time.ticks_add(t, d)

    def ticks_diff(self, a, b):
        return time.ticks_diff(a, b)

    def sleep_ms(self, ms):
        time.sleep_ms(ms)


class _Out:
    def __init__(self, pin, active_low):
        self.pin = pin
        self.low = active_low
        self.off()

    def on(self):
        self.pin.value(0 if self.low else 1)

    def off(self):
        self.pin.value(1 if self.low else 0)


class Board:
    def __init__(self, status_led=2):
        self.clock = Clock()
        self.status_led = status_led
        self._wlan = None
        self._ppp = None
        self._tls = None

    # ------------------------------------------------------------ plumbing

    def path(self, p):
        return p

    def log(self, msg):
        print(msg)

    def collect(self):
        gc.collect()

    # ------------------------------------------------------------ pins and buses

    def pin_out(self, n, active_low=False):
        from machine import Pin

        return _Out(Pin(n, Pin.OUT, hold=False), active_low)  # release a hold kept over deep sleep

    def adc(self, n):
        from machine import ADC, Pin

        a = ADC(Pin(n))
        a.atten(ADC.ATTN_11DB)  # 0..~3.1 V full scale
        return a

    def pulse_in(self, n, pull, edge, handler):
        from machine import Pin

        pulls = {"up": Pin.PULL_UP, "down": Pin.PULL_DOWN, "none": None}
        p = Pin(n, Pin.IN, pulls[pull])
        p.irq(handler, Pin.IRQ_FALLING if edge == "falling" else Pin.IRQ_RISING)
        return p

    def i2c(self, bus, scl, sda, freq):
        from machine import I2C, Pin

        return I2C(bus, scl=Pin(scl), sda=Pin(sda), freq=freq)

    def uart(self, n, tx, rx, baud, parity, stop):
        from machine import UART

        par = {"none": None, "even": 0, "odd": 1}[parity]
        kw = {}
        if tx is not None:
            kw["tx"] = tx
        if rx is not None:
            kw["rx"] = rx
        # timeout=0: readinto() returns at once; the Modbus master keeps its own deadline
        return UART(n, baudrate=baud, bits=8, parity=par, stop=stop, timeout=0, timeout_char=0, **kw)

    def disable_irq(self):
        import machine

        return machine.disable_irq()

    def enable_irq(self, state):
        import machine

        machine.enable_irq(state)

    # ------------------------------------------------------------ power and reset

    def wdt(self, timeout_ms):
        from machine import WDT

        return WDT(timeout=timeout_ms)

    def rtc_read(self):
        from machine import RTC

        b = RTC().memory()
        return b if b else None

    def rtc_write(self, buf):
        """False when the image does not fit the RTC memory."""
        if len(buf) > _RTC_MAX:
            return False
        from machine import RTC

        RTC().memory(buf)
        return True

    def reset_cause(self):
        """ "sleep" (timer wake), "pin" (woken by a pulse pin), "soft", "wdt" or "cold"."""
        import machine

        c = machine.reset_cause()
        if c == machine.DEEPSLEEP_RESET:
            pin_wakes = (
                getattr(machine, "PIN_WAKE", 2),
                getattr(machine, "EXT0_WAKE", 2),
                getattr(machine, "EXT1_WAKE", 3),
            )
            return "pin" if machine.wake_reason() in pin_wakes else "sleep"
        if c == machine.SOFT_RESET:
            return "soft"
        if c == machine.WDT_RESET:
            return "wdt"
        return "cold"

    def deepsleep(self, ms, wake_pin=None, hold=()):
        """Sleep `ms`; wake early when `wake_pin` goes low (rain gauge); outputs in `hold` keep
        their level through the sleep (a beacon that is on stays on)."""
        import esp32
        import machine

        if wake_pin is not None:
            esp32.wake_on_ext0(pin=machine.Pin(wake_pin, machine.Pin.IN), level=esp32.WAKEUP_ALL_LOW)
        for n in hold:
            machine.Pin(n).init(hold=True)
        if hold:
            esp32.gpio_deep_sleep_hold(True)
        machine.deepsleep(max(ms, 1))

    def reset(self):
        import machine

        machine.reset()

    # ------------------------------------------------------------ network

    def net_up(self, net, secrets, feed):
        """Bring the link up (Wi-Fi station or PPP over a cellular modem); True when it is up.
        `feed` is called while waiting, so the watchdog does not fire."""
        kind = net["type"]
        if kind == "none":
            return True
        import network

        deadline = time.ticks_add(time.ticks_ms(), net["timeout_ms"])
        if kind == "wifi":
            if self._wlan is None:
                self._wlan = network.WLAN(network.STA_IF)
                self._wlan.active(True)
            link = self._wlan
            if not link.isconnected():
                link.connect(net["ssid"], secrets.wifi_password or "")
        else:
            if self._ppp is None:
                u = net["uart"]
                uart = self.uart(u["id"], u["tx"], u["rx"], u["baud"], u["parity"], u["stop"])
                self._modem_dial(uart, net.get("apn"))
                self._ppp = network.PPP(uart)
            link = self._ppp
            if not link.isconnected():
                link.connect()
        while not link.isconnected():
            if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                return False
            feed()
            time.sleep_ms(200)
        if not self.clock.valid():
            try:
                import ntptime

                ntptime.settime()
            except Exception as e:  # noqa: BLE001 (no NTP: readings keep the unset clock)
                self.log("yujing: NTP failed (%s)" % e)
        return True

    def _modem_dial(self, uart, apn):
        for cmd in (b"AT\r", b'AT+CGDCONT=1,"IP","' + (apn or "").encode() + b'"\r', b"ATD*99#\r"):
            uart.write(cmd)
            time.sleep_ms(500)
            uart.read()

    def connect(self, host, port, timeout_ms, tls=None):
        """A stream to the broker with write/readinto/settimeout/close (what mqtt.Client needs). With `tls`
        (config.load_tls: the site CA and the node's certificate and key, DER), TLS with the CA required and
        the host name checked; a handshake failure (unknown CA, revoked or wrong certificate) is an OSError."""
        import socket

        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], ai[1], ai[2])
        s.settimeout(timeout_ms / 1000)
        try:
            s.connect(ai[-1])
            if tls is None:
                return s
            return _TlsStream(self._tls_context(tls).wrap_socket(s, server_hostname=host), timeout_ms)
        except OSError:
            s.close()
            raise

    def _tls_context(self, tls):
        """One SSLContext for every connect: the CA and the key are parsed once (mbedTLS keeps them)."""
        if self._tls is None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(cadata=tls["ca"])
                if tls.get("cert") is not None:
                    ctx.load_cert_chain(tls["cert"], tls["key"])
            except ValueError as e:  # mbedTLS could not parse a file: say so, as a failed connect
                raise OSError("TLS files: %s" % e) from None
            self._tls = ctx
        return self._tls


class _TlsStream:
    """An SSL socket as mqtt.Client wants a stream. MicroPython's SSLSocket has no settimeout, and a blocking
    read that times out underneath leaves mbedTLS with an error; so the socket is non-blocking and waits happen
    in poll(), which also reports bytes mbedTLS has already decrypted but not yet handed out."""

    def __init__(self, tls, timeout_ms):
        import select

        self.s = tls
        tls.setblocking(False)
        self.poll = select.poll()
        self.poll.register(tls, select.POLLIN)
        self._in = select.POLLIN
        self._out = select.POLLOUT
        self.timeout_ms = timeout_ms

    def settimeout(self, t):
        self.timeout_ms = int(t * 1000) if t else 0

    def _wait(self, mask, deadline):
        self.poll.modify(self.s, mask)
        left = time.ticks_diff(deadline, time.ticks_ms())
        return left > 0 and bool(self.poll.poll(left))

    def readinto(self, buf):
        """Bytes read, 0 at EOF, None when nothing came within the timeout."""
        deadline = time.ticks_add(time.ticks_ms(), self.timeout_ms)
        while True:
            n = self.s.readinto(buf)
            if n is not None:
                return n
            if not self.timeout_ms or not self._wait(self._in, deadline):
                return None

    def write(self, buf):
        mv = memoryview(buf)
        deadline = time.ticks_add(time.ticks_ms(), self.timeout_ms or 5000)
        while mv:
            n = self.s.write(mv)
            if n:
                mv = mv[n:]
            elif not self._wait(self._out, deadline):
                raise OSError(110)  # ETIMEDOUT: the broker does not take our bytes
        return len(buf)

    def close(self):
        self.s.close()
