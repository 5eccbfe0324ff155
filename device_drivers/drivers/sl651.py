"""SL 651-2014 telemetry stations (RTUs) that push their reports, with the gateway as their centre.

The bus listens on a TCP port (stations on GPRS/4G DTUs connect to it) or reads a serial port (a radio
modem). Each device is one station (its 5-byte address); each point is one element (by its ASCII name or
hex identifier, from the element table), so a report's values become readings stamped with the station's
observation time. Reports are confirmed (M2), multi-packet messages (M3) are put back together in any
order, a report sent twice (a station that missed the confirm) is delivered once, and frames with a bad
CRC, another centre's address, an unknown station or a wrong password are refused with a log line.
A station silent for `offline_after` × `interval_s` gets OFFLINE readings once per interval.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .. import sl651
from ..base import Delivery, Device, Link, Result, serial_open_failure
from ..fields import ID_HINT, ID_RE, NUMBER, Reader, positive
from ..model import Quality, Value

KIND = "sl651"

SAMPLE = """\
[[buses]]
name = "hydro"
type = "sl651"
listen = "0.0.0.0:5005"     # stations connect here over TCP; or port = "/dev/ttyS3" (a radio modem)
centre = 1                  # this centre's address, 1..255
# utc_offset = "+08:00"     # the stations' clocks (Beijing time)
# confirm = "EOT"           # how reports are confirmed: "EOT" (done), "ACK", "ESC" (stay online), "none"

[[devices]]
name = "dam-rtu"
bus = "hydro"
station = "0053010001"      # the station's 5-byte address, 10 hex digits
# password = "1234"         # when set, frames with another password are refused
interval_s = 3600           # how often it reports at least (its timed-report interval)
# offline_after = 3         # silent for 3 intervals: offline
  [[devices.points]]
  name = "ZU"
  element = "ZU"            # an element of SL 651 Table C.1: its ASCII name or hex identifier ("3B")
  # unit = "m"              # default: the element table's
  [[devices.points]]
  name = "level_alarm"
  element = "ZT"            # the status word (HEX)…
  bit = 2                   # …one bit of it: true/false
"""

log = logging.getLogger("yujing.sl651")
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")
MAX_CONNECTIONS = 64
ENDS = {"EOT": sl651.EOT, "ACK": sl651.ACK, "ESC": sl651.ESC, "none": None}


@dataclass(frozen=True)
class CentreSettings:
    centre: int
    listen: tuple[str, int] | None = None
    port: str | None = None  # serial
    baudrate: int = 9600
    utc_offset_min: int = 480
    confirm: int | None = sl651.EOT
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Station:
    address: str  # 10 upper-case hex digits
    password: int | None = None


@dataclass(frozen=True)
class ElementPoint:
    name: str
    element: int
    unit: str
    type: str  # "decimal", "int" or "bool"
    bit: int | None = None


def parse_bus(r: Reader, kind: str) -> CentreSettings | None:
    listen = r.get("listen", str, None, check=lambda v: ":" in v and v.rpartition(":")[2].isdigit(), hint='"HOST:PORT", e.g. "0.0.0.0:5005"')
    port = r.get("port", str, None)
    baud = r.get("baudrate", int, 9600, check=lambda v: v in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200), hint="a standard rate")
    centre = r.get("centre", int, check=lambda v: 1 <= v <= 255, hint="1..255")
    offset_text = r.get("utc_offset", str, "+08:00", check=_OFFSET.match, hint='"+HH:MM"')
    confirm = r.get("confirm", str, "EOT", check=lambda v: v in ENDS, hint=", ".join(ENDS))
    timeout = r.get("timeout_s", NUMBER, 30.0, check=positive, hint="> 0")
    if (listen is None) == (port is None):
        r.error("listen", "give listen (TCP) or port (serial), one of them")
        return None
    if centre is None:
        return None
    m = _OFFSET.match(offset_text or "+08:00")
    offset = (int(m.group(2)) * 60 + int(m.group(3))) * (-1 if m.group(1) == "-" else 1) if m else 480
    where = None
    if listen is not None:
        host, _, p = listen.rpartition(":")
        where = (host, int(p))
    return CentreSettings(centre, where, port, baud, offset, ENDS[confirm or "EOT"], float(timeout))


def parse_device(r: Reader, bus: Any) -> tuple[Station, tuple[ElementPoint, ...]] | None:
    address = r.get("station", str, check=lambda v: re.fullmatch(r"[0-9A-Fa-f]{10}", v) is not None, hint="10 hex digits, e.g. \"0053010001\"")
    password = r.get("password", str, None, check=lambda v: re.fullmatch(r"[0-9A-Fa-f]{4}", v) is not None, hint="4 hex digits")
    raw_points = r.take("points") or []
    points = []
    if not isinstance(raw_points, list) or not raw_points:
        r.error("points", "a station needs at least one [[devices.points]] (an element)")
        raw_points = []
    for j, table in enumerate(raw_points):
        pr = Reader(table, f"{r.path}.points[{j}]", r.errors)
        if not pr.ok:
            continue
        name = pr.get("name", str, check=ID_RE.match, hint=ID_HINT)
        ref = pr.get("element", (str, int))
        unit = pr.get("unit", str, None)
        bit = pr.get("bit", int, None, check=lambda v: 0 <= v <= 31, hint="0..31")
        pr.finish()
        el = sl651.element(ref) if ref is not None else None
        if ref is not None and el is None:
            names = ", ".join(sorted(sl651.elements()[1]))
            pr.error("element", f"no element {ref!r} in the SL 651 table (names: {names}; or a hex identifier of one)")
        if el is not None and bit is not None and el.encoding != "hex":
            pr.error("bit", f"{el.name} is a number, not a status word: bit is for HEX elements such as ZT")
        if el is not None and el.encoding in ("drp", "drz"):
            pr.error("element", f"{el.name} holds 12 values: take its sum or level elements (e.g. P1, Z) instead")
            el = None
        if name is None or el is None:
            continue
        typ = "bool" if bit is not None else ("int" if el.encoding == "hex" else "decimal")
        points.append(ElementPoint(name, el.id, el.unit if unit is None else unit, typ, bit))
    names = [p.name for p in points]
    for j, n in enumerate(names):
        if names.index(n) != j:
            r.error(f"points[{j}].name", f"point {n!r} is already defined at points[{names.index(n)}]")
    if address is None or len(points) != len(raw_points) or len(set(names)) != len(names):
        return None
    return Station(address.upper(), int(password, 16) if password else None), tuple(points)


def check(buses: Sequence[Any], devices: Sequence[tuple[int, Any]], errors: list[Any]) -> None:
    from ..fields import Problem

    seen: dict[tuple[str, str], str] = {}
    for i, d in devices:
        key = (d.bus, d.spec.address)
        if key in seen:
            errors.append(Problem(f"devices[{i}].station", f"station {d.spec.address} is already device {seen[key]!r}"))
        seen.setdefault(key, d.name)


def requests_per_poll(device: Device) -> int:
    return 0  # stations push their reports


def station_time_ms(t: sl651.Time, offset_min: int) -> int:
    y, mo, d, h, mi, s = t
    return (calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offset_min * 60) * 1000


def local_time(epoch_ms: int, offset_min: int) -> sl651.Time:
    t = time.gmtime(epoch_ms // 1000 + offset_min * 60)
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


class SL651Driver:
    def __init__(self, bus: Any, devices: Sequence[Device]) -> None:
        self.bus = bus
        self.settings: CentreSettings = bus.settings
        self.devices = {d.spec.address: d for d in devices}
        self._seen: OrderedDict[tuple[str, int, int, sl651.Time], None] = OrderedDict()  # recent reports (dedup)
        self._last_heard: dict[str, float] = {}
        self._reassembler = sl651.Reassembler()
        self._refused_since_log = 0
        self._refusal_logged_at: float | None = None
        self.frames = 0
        self.refused = 0
        self.duplicates = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def polled(self, device: Device) -> bool:
        return False

    async def read(self, device: Device, link: Link, attempts: int, group: tuple[int, ...] | None = None) -> tuple[list[Result], bool]:
        raise NotImplementedError("SL 651 stations push their reports")

    async def write(self, kind: str, unit: int, address: int, value: int | bool, link: Link) -> None:
        raise ValueError(f"bus {self.bus.name}: SL 651 stations take no output writes")

    # ---------------------------------------------------------- receiving

    async def run(self, deliver: Delivery, link: Link) -> None:
        watchdog = asyncio.ensure_future(self._silence(deliver, link))
        try:
            if self.settings.listen is not None:
                host, port = self.settings.listen
                self._server = await asyncio.start_server(lambda r, w: self._connection(r, w, deliver, link), host, port, limit=65536)
                log.info("%s: SL 651 centre %d listening on %s:%d", self.bus.name, self.settings.centre, host, port)
                await asyncio.Event().wait()
            else:
                await self._serial(deliver, link)
        finally:
            watchdog.cancel()
            self.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deliver: Delivery, link: Link) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._connections) >= MAX_CONNECTIONS:
            # Each connection holds a frame's worth of bytes and pays for its own checks; their number is
            # what bounds the whole. A station that finds the centre full dials again (M2 resends).
            self._refuse(None, f"from {peer}: {MAX_CONNECTIONS} stations already connected; closed")
            writer.close()
            return
        deframer = sl651.Deframer()
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(4096), self.settings.timeout_s * 10)
                if not data:
                    return
                for frame in deframer.feed(data):
                    reply = self._frame(frame, deliver, link)
                    if reply is not None:
                        writer.write(reply)
                        await writer.drain()
                if deframer.bad:
                    self._refuse(None, f"from {peer}: {deframer.bad[-1]}", len(deframer.bad))
                    deframer.bad = []
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # The bus is closing. Nothing awaits a connection task, and asyncio's stream callback (3.11)
            # logs a cancelled one as an error: end it quietly.
            return
        except Exception:
            log.exception("%s: connection from %s dropped", self.bus.name, peer)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _serial(self, deliver: Delivery, link: Link) -> None:
        import serial

        gap = 0.5
        while True:
            try:
                port = serial.Serial(self.settings.port, self.settings.baudrate, timeout=0, exclusive=True)
            except (OSError, ValueError, serial.SerialException) as exc:
                log.warning("%s: %s; retrying in %.1f s", self.bus.name, serial_open_failure(self.settings.port, exc), gap)
                await link.pause(gap)
                gap = min(gap * 2, 30.0)
                continue
            heard = False
            deframer = sl651.Deframer()
            queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
            loop = asyncio.get_running_loop()

            def readable() -> None:
                try:
                    data = os.read(port.fileno(), 4096)
                except BlockingIOError:
                    return
                except OSError as exc:  # unplugged: stop watching the fd (it would fire forever) and reopen
                    log.warning("%s: %s: read failed: %s; reopening", self.bus.name, self.settings.port, exc.strerror)
                    data = b""
                if not data:
                    loop.remove_reader(port.fileno())
                    with contextlib.suppress(asyncio.QueueFull):
                        queue.put_nowait(None)
                elif not queue.full():
                    queue.put_nowait(data)

            loop.add_reader(port.fileno(), readable)
            try:
                while (data := await queue.get()) is not None:
                    heard = True
                    for frame in deframer.feed(data):
                        reply = self._frame(frame, deliver, link)
                        if reply is not None:
                            try:
                                os.write(port.fileno(), reply)
                            except OSError as exc:  # the confirm is lost; the station sends again (M2)
                                log.warning("%s: %s: write failed: %s", self.bus.name, self.settings.port, exc.strerror)
                    if deframer.bad:
                        self._refuse(None, f"on {self.settings.port}: {deframer.bad[-1]}", len(deframer.bad))
                        deframer.bad = []
            finally:
                loop.remove_reader(port.fileno())
                port.close()
            # A port that opens and hangs up at once (a radio modem without power, a dead USB adapter) is
            # retried at a growing interval, not in a loop.
            gap = 0.5 if heard else min(gap * 2, 30.0)
            await link.pause(gap)

    def _frame(self, f: sl651.Frame, deliver: Delivery, link: Link) -> bytes | None:
        """One frame from a station → readings; the confirm to send back, if any."""
        self.frames += 1
        if not f.up:
            return None
        if f.centre != self.settings.centre:
            return self._refuse(f, f"addressed to centre {f.centre}, this is {self.settings.centre}")
        device = self.devices.get(f.station)
        if device is None:
            return self._refuse(f, f"unknown station {f.station} (add it as a device to take its reports)")
        station: Station = device.spec
        if station.password is not None and f.password != station.password:
            return self._refuse(f, f"station {f.station}: wrong password")
        self._last_heard[f.station] = asyncio.get_running_loop().time()
        try:
            body = self._reassembler.add(f)
        except sl651.SL651Error as exc:
            return self._refuse(f, str(exc))
        if body is None or f.function == sl651.F_KEEPALIVE:
            return None  # more packets to come; a keep-alive needs no answer
        if f.function not in sl651.REPORT_FUNCTIONS:
            log.info("%s: station %s: %s (function %02X) not taken", self.bus.name, f.station,
                     sl651.FUNCTION_NAMES.get(f.function, "an unsupported message"), f.function)
            return None
        try:
            report = sl651.decode_report(body)
        except sl651.SL651Error as exc:
            return self._refuse(f, f"station {f.station}: {exc}")
        key = (f.station, f.function, report.serial, report.observed)
        if key in self._seen:
            self.duplicates += 1  # sent again after a lost confirm: confirm again, deliver nothing
        else:
            self._seen[key] = None
            while len(self._seen) > 1024:
                self._seen.popitem(last=False)
            readings = self._readings(device, report)
            if readings:
                deliver(device.name, readings)
        if self.settings.confirm is None or f.function == sl651.F_QUERY:
            return None
        # Table 23: a multi-packet message is confirmed once, in a SYN frame whose total comes from the
        # station's packets and whose sequence number, for EOT/ESC, is the last one (= the total).
        packet = None if f.packet is None else (f.packet[0], f.packet[0])
        confirm = sl651.Frame(False, self.settings.centre, f.station, f.password, f.function,
                              sl651.encode_short_body(report.serial, local_time(link.now_ms(), self.settings.utc_offset_min)),
                              self.settings.confirm, packet)
        return sl651.encode_frame(confirm)

    def _readings(self, device: Device, report: sl651.Report) -> list[tuple[int, int, Value, int]]:
        offset = self.settings.utc_offset_min
        out: list[tuple[int, int, Value, int]] = []
        for j, p in enumerate(device.points):
            for ident, t, value in report.values:
                if ident != p.element:
                    continue
                ts = station_time_ms(t, offset)
                if value is None:
                    out.append((j, ts, None, Quality.DEVICE_FAULT))  # the station reports it has no value
                elif p.bit is not None:
                    out.append((j, ts, bool((int(value) >> p.bit) & 1), Quality.GOOD))  # type: ignore[arg-type]
                elif isinstance(value, (Decimal, int)):
                    out.append((j, ts, value, Quality.GOOD))
        return out

    def _refuse(self, f: sl651.Frame | None, why: str, count: int = 1) -> None:
        # A station (or anyone who reaches the port) can send refusals as fast as the link carries them: one
        # log line a minute at most, with the count and the latest reason, keeps the journal and memory bounded.
        self.refused += count
        self._refused_since_log += count
        now = time.monotonic()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= 60.0:
            more = f" ({self._refused_since_log} refused since the last report)" if self._refused_since_log > 1 else ""
            log.warning("%s: frame refused: %s%s", self.bus.name, why, more)
            self._refusal_logged_at = now
            self._refused_since_log = 0
        return None

    async def _silence(self, deliver: Delivery, link: Link) -> None:
        """Stations that stopped reporting get OFFLINE readings, once per interval."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await link.pause(min((d.interval_s for d in self.devices.values()), default=60.0) if self.devices else 60.0)
            now = loop.time()
            for address, d in self.devices.items():
                interval = float(getattr(d, "interval_s", 60.0))
                silent = now - self._last_heard.get(address, started)
                if silent > interval * float(getattr(d, "offline_after", 3)):
                    deliver(d.name, [(j, link.now_ms(), None, Quality.OFFLINE) for j in range(len(d.points))])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
