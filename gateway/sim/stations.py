"""Simulated instruments that are not Modbus, for `yujing demo`, tests and benchmarks.

- `SimAnemometer`: an ultrasonic anemometer on a pseudo-terminal that streams NMEA 0183 `MWV` sentences
  (`$IIMWV,<direction>,R,<speed>,M,A*hh`, the line format of Gill WindSonic-class instruments in NMEA mode).
- `SimHydroStation`: an SL 651-2014 telemetry station (RTU) that connects to a centre over TCP and sends a
  32H timed report every `interval_s`, reading the centre's confirms; it reconnects when the centre goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
import tty
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from device_drivers import sl651
from device_drivers.lines import nmea_checksum


def mwv_sentence(direction: float, speed: float, status: str = "A") -> bytes:
    body = f"IIMWV,{direction:05.1f},R,{speed:05.1f},M,{status}"
    return f"${body}*{nmea_checksum(body)}\r\n".encode()


class SimAnemometer:
    """Writes one MWV sentence every `period_s`; `values(t)` gives (direction °, speed m/s) at time t."""

    def __init__(self, values: Callable[[float], tuple[float, float]], period_s: float = 0.25) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master, termios.TCSANOW)
        tty.setraw(self.slave, termios.TCSANOW)
        self.path = os.ttyname(self.slave)
        self.values = values
        self.period_s = period_s
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            direction, speed = self.values(loop.time() - t0)
            try:
                os.write(self.master, mwv_sentence(direction, speed))
                self.sent += 1
            except BlockingIOError:
                pass  # nobody reads the line: an instrument keeps talking regardless
            await asyncio.sleep(self.period_s)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class SimHydroStation:
    """An SL 651 station: `elements(t)` gives {element identifier: value} for a report at time t."""

    def __init__(self, centre: tuple[str, int], *, station: str, centre_address: int = 1, password: int = 0x1234,
                 station_class: int = 0x50, interval_s: float = 5.0,
                 elements: Callable[[float], dict[int, Decimal]], utc_offset_h: int = 8) -> None:
        self.centre = centre
        self.station = station
        self.centre_address = centre_address
        self.password = password
        self.station_class = station_class
        self.interval_s = interval_s
        self.elements = elements
        self.tz = timezone(timedelta(hours=utc_offset_h))
        self.serial = 0
        self.sent = 0
        self.confirms = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def report(self, t: float) -> bytes:
        now = datetime.now(self.tz)
        sent = (now.year, now.month, now.day, now.hour, now.minute, now.second)
        observed = (now.year, now.month, now.day, now.hour, now.minute, 0)
        self.serial = self.serial % 65535 + 1
        values = tuple((ident, observed, value) for ident, value in self.elements(t).items())
        body = sl651.encode_report(sl651.Report(self.serial, sent, self.station, self.station_class, observed, values))
        return sl651.encode_frame(sl651.Frame(True, self.centre_address, self.station, self.password, 0x32, body, sl651.ETX))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        deframer = sl651.Deframer()
        while True:
            due = loop.time() + self.interval_s
            try:
                if conn is None:  # a station dials in to report, as a GPRS RTU does
                    conn = await asyncio.open_connection(*self.centre)
                    deframer = sl651.Deframer()
                reader, writer = conn
                writer.write(self.report(loop.time() - t0))
                await writer.drain()
                self.sent += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, due - loop.time())):
                        while data := await reader.read(512):
                            self.confirms += sum(1 for f in deframer.feed(data) if not f.up)
                        writer.close()  # the centre hung up (EOT): dial again for the next report
                        conn = None
            except OSError:
                if conn is not None:
                    conn[1].close()
                conn = None
            await asyncio.sleep(max(0.0, due - loop.time()))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
