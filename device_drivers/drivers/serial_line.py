"""Plain serial line instruments: ASCII over RS-232/RS-485 without Modbus.

Two modes. `stream`: the instrument prints lines by itself (an ultrasonic anemometer's NMEA sentences);
the driver reads them as they come and, once per `interval_s`, delivers the newest good line's values.
`poll`: the scheduler asks; the driver sends `command` and reads one line back (a laser distance meter).

Each line is framed (terminator, optional start character, optional NMEA `*hh` checksum) and split into
fields (a separator, or a regular expression with named groups); each point takes one field, with a type,
scale, offset and unit. What goes wrong becomes a quality, never a crash or a stall: garbage, a broken or
overlong line, a wrong baud rate (FRAMING), a field that is no number (DECODE), silence (TIMEOUT), a lost
port (TRANSPORT, reopened with backoff), a status field that says invalid (DEVICE_FAULT). Failures are
logged at most once a minute per device, with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..base import Delivery, Device, Link, Result, TransportError, serial_open_failure
from ..fields import ID_HINT, ID_RE, NUMBER, Reader, decimal, positive
from ..lines import Garbage, LineError, LineFormat, LineFramer, parse_value
from ..model import Quality

KIND = "serial_line"

SAMPLE = """\
[[buses]]
name = "anemometer"
type = "serial_line"
port = "/dev/ttyS2"
baudrate = 4800             # 1200 … 115200
# bytesize = 8
# parity = "N"
# stopbits = 1
# timeout_s = 1.0           # poll mode: how long to wait for the answer

[[devices]]
name = "wind"
bus = "anemometer"
interval_s = 1              # stream mode: deliver the newest good line once per interval
mode = "stream"             # "stream": the instrument talks by itself; "poll": send `command`, read a line
# command = "D\\r\\n"         # poll mode only
# terminator = "\\r\\n"
start = "$"                 # optional: the start character; noise before it is dropped
checksum = "nmea"           # "none" or "nmea" (*hh, XOR of the characters between start and *)
separator = ","             # or pattern = '(?P<dist>[-0-9.]+) m' (named groups)
# max_line = 256            # longer lines are garbage
valid = { field = 5, equals = "A" }   # optional: a status field; anything else is device_fault
  [[devices.points]]
  name = "direction"
  field = 1                 # separator: the field's index (0 is the sentence id); pattern: group = "name"
  unit = "deg"
  # type = "decimal"        # "decimal" (exact), "int" or "bool"
  # scale = 1
  # offset = 0
  # min = 0
  # max = 360
  [[devices.points]]
  name = "speed"
  field = 3
  unit = "m/s"
"""

log = logging.getLogger("yujing.serial_line")

PARITIES = {"N": "N", "E": "E", "O": "O", "none": "N", "even": "E", "odd": "O"}
TYPES = ("decimal", "int", "bool")


@dataclass(frozen=True)
class LineSettings:
    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1
    timeout_s: float = 1.0


@dataclass(frozen=True)
class LinePoint:
    name: str
    key: str | int  # field index or pattern group
    type: str = "decimal"
    scale: Decimal = Decimal(1)
    offset: Decimal = Decimal(0)
    unit: str = ""
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class LineDevice:
    mode: str
    format: LineFormat
    terminator: bytes
    command: bytes | None = None
    max_line: int = 256
    valid: tuple[str | int, str] | None = None  # (field, the value that means valid)


# ---------------------------------------------------------------------------------------------- configuration


def _escapes(text: str) -> str:
    # TOML basic strings already turn \r \n into characters; literal strings ('…') keep them as written.
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _ascii(text: str) -> bool:
    """The line's framing is bytes of ASCII: a start, terminator or command outside it could never match."""
    try:
        _escapes(text).encode("ascii")
    except (UnicodeError, ValueError):
        return False
    return True


def parse_bus(r: Reader, kind: str) -> LineSettings | None:
    port = r.get("port", str)
    baud = r.get("baudrate", int, 9600, check=lambda v: v in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200), hint="a standard rate (1200..115200)")
    bytesize = r.get("bytesize", int, 8, check=lambda v: v in (7, 8), hint="7 or 8")
    parity = r.get("parity", str, "N", check=lambda v: v in PARITIES, hint='"N", "E" or "O"')
    stopbits = r.get("stopbits", int, 1, check=lambda v: v in (1, 2), hint="1 or 2")
    timeout = r.get("timeout_s", NUMBER, 1.0, check=positive, hint="> 0")
    return LineSettings(port, baud, bytesize, PARITIES[parity or "N"], stopbits, float(timeout)) if port else None


def parse_device(r: Reader, bus: Any) -> tuple[LineDevice, tuple[LinePoint, ...]] | None:
    problems_before = len(r.errors)
    mode = r.get("mode", str, "stream", check=lambda v: v in ("stream", "poll"), hint='"stream" or "poll"')
    command = r.get("command", str, None, check=lambda v: bool(v) and _ascii(v), hint="ASCII text to send, e.g. \"D\\r\\n\"")
    terminator = r.get("terminator", str, "\r\n", check=lambda v: bool(v) and _ascii(v), hint='ASCII, e.g. "\\r\\n", "\\n" or "\\u0003"')
    start = r.get("start", str, "", check=_ascii, hint='an ASCII character, e.g. "$"')
    checksum = r.get("checksum", str, "none", check=lambda v: v in ("none", "nmea"), hint='"none" or "nmea"')
    separator = r.get("separator", str, None, check=bool, hint="e.g. \",\"")
    pattern_text = r.get("pattern", str, None)
    max_line = r.get("max_line", int, 256, check=lambda v: 8 <= v <= 4096, hint="8..4096")
    valid_table = r.get("valid", dict, None)
    raw_points = r.take("points") or []
    if mode == "poll" and command is None:
        r.error("command", "poll mode sends a command and reads the answer: give command (e.g. \"D\\r\\n\")")
    if mode == "stream" and command is not None:
        r.error("command", "a command is for poll mode; in stream mode the instrument talks by itself")
    if separator is not None and pattern_text is not None:
        r.error("pattern", "give separator or pattern, not both")
    pattern = None
    if pattern_text is not None:
        try:
            pattern = re.compile(pattern_text)
        except re.error as exc:
            r.error("pattern", f"not a regular expression: {exc}")
        else:
            if not pattern.groupindex:
                r.error("pattern", "needs named groups, e.g. (?P<distance>[0-9.]+), that points take")
                pattern = None
    valid = None
    if valid_table is not None:
        vr = Reader(valid_table, r.key("valid"), r.errors)
        vfield = vr.get("field", (int, str))
        equals = vr.get("equals", str)
        vr.finish()
        if vfield is not None and equals is not None:
            valid = (vfield, equals)
            if pattern is not None and (not isinstance(vfield, str) or vfield not in pattern.groupindex):
                vr.error("field", f"with a pattern, the status field is one of its groups ({', '.join(pattern.groupindex)})")
                valid = None
            elif pattern is None and pattern_text is None and not (isinstance(vfield, int) and 0 <= vfield <= 255):
                vr.error("field", "with a separator, the status field is an index, 0..255")
                valid = None
    points = []
    if not isinstance(raw_points, list) or not raw_points:
        r.error("points", "a device needs at least one [[devices.points]]")
        raw_points = []
    for j, table in enumerate(raw_points):
        pr = Reader(table, f"{r.path}.points[{j}]", r.errors)
        if not pr.ok:
            continue
        name = pr.get("name", str, check=ID_RE.match, hint=ID_HINT)
        field_index = pr.get("field", int, None, check=lambda v: 0 <= v <= 255, hint="0..255")
        group = pr.get("group", str, None)
        typ = pr.get("type", str, "decimal", check=lambda v: v in TYPES, hint=", ".join(TYPES))
        scale = pr.get("scale", NUMBER, 1, check=lambda v: v != 0, hint="not 0")
        offset = pr.get("offset", NUMBER, 0)
        unit = pr.get("unit", str, "")
        vmin = pr.get("min", NUMBER, None)
        vmax = pr.get("max", NUMBER, None)
        pr.finish()
        if vmin is not None and vmax is not None and vmin > vmax:
            pr.error("min", f"min {vmin} is above max {vmax}")
        key: str | int | None = None
        if pattern is not None or pattern_text is not None:
            if field_index is not None:
                pr.error("field", "with a pattern, a point takes a group, not a field index")
            if group is None:
                pr.error("group", "with a pattern, each point names its group")
            elif pattern is not None and group not in pattern.groupindex:
                pr.error("group", f"the pattern has no group {group!r} (it has {', '.join(pattern.groupindex)})")
            key = group
        else:
            if group is not None:
                pr.error("group", "a group is for a pattern; with a separator, a point takes a field index")
            if field_index is None:
                pr.error("field", "the index of the field this point reads (0 is the first)")
            key = field_index
        if name is not None and key is not None:
            points.append(LinePoint(name, key, typ or "decimal", decimal(scale or 1), decimal(offset or 0), unit or "", vmin, vmax))
    names = [p.name for p in points]
    for j, n in enumerate(names):
        if names.index(n) != j:
            r.error(f"points[{j}].name", f"point {n!r} is already defined")
    if len(points) != len(raw_points) or mode is None or (mode == "poll" and command is None) or len(r.errors) > problems_before:
        return None
    fmt = LineFormat(start=_escapes(start or ""), checksum=checksum or "none",
                     separator=None if pattern is not None else (separator or ","), pattern=pattern)
    spec = LineDevice(mode, fmt, _escapes(terminator or "\r\n").encode("latin-1"),
                      _escapes(command).encode("latin-1") if command else None, max_line or 256, valid)
    return spec, tuple(points)


def check(buses: Sequence[Any], devices: Sequence[tuple[int, Any]], errors: list[Any]) -> None:
    """A streaming instrument owns its line: it talks whenever it likes, so nothing else can share the bus."""
    from ..fields import Problem

    by_bus: dict[str, list[tuple[int, Any]]] = {}
    for i, d in devices:
        by_bus.setdefault(d.bus, []).append((i, d))
    for bus, members in by_bus.items():
        streams = [(i, d) for i, d in members if d.spec.mode == "stream"]
        if streams and len(members) > 1:
            i, d = streams[0]
            errors.append(Problem(f"devices[{i}].mode", f"{d.name!r} streams on its own, so bus {bus!r} cannot carry other devices"))
        first_i, first = members[0]
        for i, d in members[1:]:  # the bus cuts lines once, for every device on it
            if (d.spec.terminator, d.spec.max_line) != (first.spec.terminator, first.spec.max_line):
                errors.append(Problem(f"devices[{i}].terminator", f"devices on bus {bus!r} share one line framing: terminator and "
                                                                  f"max_line must match {first.name!r} (devices[{first_i}])"))


# ---------------------------------------------------------------------------------------------- runtime


def requests_per_poll(device: Device) -> int:
    return 1 if device.spec.mode == "poll" else 0  # a streaming instrument is never asked


def _values(device: Device, fields: dict[str | int, str]) -> list[Result]:
    spec: LineDevice = device.spec
    if spec.valid is not None:
        vfield, equals = spec.valid
        if fields.get(vfield) != equals:
            return [(None, Quality.DEVICE_FAULT)] * len(device.points)
    out: list[Result] = []
    for p in device.points:
        text = fields.get(p.key)
        if text is None or text == "":
            out.append((None, Quality.DECODE))
            continue
        try:
            value = parse_value(text, p.type, p.scale, p.offset)
        except LineError as exc:
            out.append((None, exc.quality))
            continue
        if not isinstance(value, bool) and ((p.min is not None and value < p.min) or (p.max is not None and value > p.max)):
            out.append((value, Quality.OUT_OF_RANGE))
        else:
            out.append((value, Quality.GOOD))
    return out


class _Complaints:
    """Counts failures per device and logs them at most once a minute."""

    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.counts: dict[str, int] = {}
        self.last: dict[str, str] = {}
        self.logged_at: dict[str, float] = {}

    def note(self, device: str, what: str) -> None:
        self.counts[device] = self.counts.get(device, 0) + 1
        self.last[device] = what
        now = time.monotonic()
        if now - self.logged_at.get(device, -1e9) >= 60:
            self.logged_at[device] = now
            log.warning("%s: %s: %d bad line(s) since the last report; the latest: %s", self.bus, device, self.counts[device], what)
            self.counts[device] = 0


class SerialLineDriver:
    def __init__(self, bus: Any, devices: Sequence[Device]) -> None:
        self.bus = bus
        self.settings: LineSettings = bus.settings
        self.devices = list(devices)
        self._serial: Any = None
        self._framer: LineFramer | None = None
        self._lines: asyncio.Queue[bytes | Garbage] | None = None
        self._complaints = _Complaints(bus.name)

    def polled(self, device: Device) -> bool:
        return device.spec.mode == "poll"

    # ---------------------------------------------------------- the port

    def _open(self) -> None:
        import serial

        s = self.settings
        try:
            self._serial = serial.Serial(s.port, s.baudrate, bytesize=s.bytesize, parity=s.parity, stopbits=s.stopbits, timeout=0,
                                         exclusive=True)
        except (OSError, ValueError, serial.SerialException) as exc:
            self._serial = None
            raise TransportError(f"{self.bus.name}: {serial_open_failure(s.port, exc)}") from None
        loop = asyncio.get_running_loop()
        self._lines = asyncio.Queue(maxsize=256)
        spec = self.devices[0].spec if self.devices else None
        self._framer = LineFramer(spec.terminator if spec else b"\r\n", spec.max_line if spec else 256)
        loop.add_reader(self._serial.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._serial is not None and self._framer is not None and self._lines is not None
        try:
            data = os.read(self._serial.fileno(), 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"read failed: {exc.strerror}")
            return
        if not data:
            self._lost("the port closed")
            return
        for item in self._framer.feed(data):
            if self._lines.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._lines.get_nowait()  # nobody is reading fast enough: the oldest line goes
            self._lines.put_nowait(item)

    def _lost(self, why: str) -> None:
        log.warning("%s: %s: %s", self.bus.name, self.settings.port, why)
        self.close()

    def _ensure_open(self) -> None:
        if self._serial is None:
            self._open()

    # ---------------------------------------------------------- poll mode

    async def read(self, device: Device, link: Link, attempts: int, group: tuple[int, ...] | None = None) -> tuple[list[Result], bool]:
        spec: LineDevice = device.spec
        quality = Quality.TIMEOUT
        for attempt in range(attempts):
            if attempt:
                await link.pause(0.1)
            try:
                results, quality = await link.transaction(lambda: self._exchange(device))
            except LineError as exc:
                quality = exc.quality
                self._complaints.note(device.name, str(exc))
                continue
            if results is not None:
                picked = results if group is None else [results[i] for i in group]
                return picked, True
        n = len(device.points) if group is None else len(group)
        return [(None, quality)] * n, quality != Quality.TIMEOUT

    async def _exchange(self, device: Device) -> tuple[list[Result] | None, int]:
        self._ensure_open()
        assert self._serial is not None and self._lines is not None and self._framer is not None
        spec: LineDevice = device.spec
        while not self._lines.empty():  # what came unasked before the command is not its answer
            self._lines.get_nowait()
        self._framer.clear()
        try:
            os.write(self._serial.fileno(), spec.command or b"")
        except OSError as exc:
            self._lost(f"write failed: {exc.strerror}")
            raise TransportError(f"{self.bus.name}: {self.settings.port}: write failed: {exc.strerror}") from None
        deadline = asyncio.get_running_loop().time() + self.settings.timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None, Quality.TIMEOUT
            try:
                item = await asyncio.wait_for(self._lines.get(), left)
            except TimeoutError:
                return None, Quality.TIMEOUT
            if isinstance(item, Garbage):
                raise LineError(Quality.FRAMING, f"{len(item.data)} bytes of garbage (wrong baud rate? noise?)")
            fields = spec.format.fields(item)  # LineError → the caller retries
            return _values(device, fields), Quality.GOOD

    # ---------------------------------------------------------- stream mode

    async def run(self, deliver: Delivery, link: Link) -> None:
        streams = [d for d in self.devices if d.spec.mode == "stream"]
        if not streams:
            await asyncio.Event().wait()
        device = streams[0]  # the check allows one streaming device per bus
        interval = float(getattr(device, "interval_s", 1.0))
        gap = 0.5
        while True:
            try:
                self._ensure_open()
            except TransportError as exc:
                # Said like a polled bus's lost port (gateway.poll.bus), not as a "bad line": no line was read.
                log.warning("%s; retrying in %.1f s", exc, gap)
                deliver(device.name, [(j, link.now_ms(), None, Quality.TRANSPORT) for j in range(len(device.points))])
                await link.pause(gap)
                gap = min(gap * 2, 30.0)
                continue
            gap = 0.5
            await self._stream(device, interval, deliver, link)

    async def _stream(self, device: Device, interval: float, deliver: Delivery, link: Link) -> None:
        assert self._lines is not None
        loop = asyncio.get_running_loop()
        spec: LineDevice = device.spec
        next_at = loop.time() + interval
        newest: tuple[int, list[Result]] | None = None
        failure: int | None = None
        while self._serial is not None:
            left = next_at - loop.time()
            if left > 0:
                try:
                    item = await asyncio.wait_for(self._lines.get(), left)
                except TimeoutError:
                    item = None
                if item is not None:
                    if isinstance(item, Garbage):
                        failure = Quality.FRAMING
                        self._complaints.note(device.name, f"{len(item.data)} bytes of garbage (wrong baud rate? noise?)")
                        continue
                    try:
                        newest = (link.now_ms(), _values(device, spec.format.fields(item)))
                    except LineError as exc:
                        failure = exc.quality
                        self._complaints.note(device.name, str(exc))
                    continue
            next_at += interval
            if next_at < loop.time():
                next_at = loop.time() + interval
            if newest is not None:
                ts, results = newest
                deliver(device.name, [(j, ts, v, q) for j, (v, q) in enumerate(results)])
            else:
                quality = failure if failure is not None else Quality.TIMEOUT
                if failure is None:
                    self._complaints.note(device.name, f"nothing for {interval:g} s (is it powered and wired? the right port?)")
                deliver(device.name, [(j, link.now_ms(), None, quality) for j in range(len(device.points))])
            newest, failure = None, None

    async def write(self, kind: str, unit: int, address: int, value: int | bool, link: Link) -> None:
        raise ValueError(f"bus {self.bus.name}: a serial line instrument has no outputs")

    def close(self) -> None:
        if self._serial is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._serial.fileno())
            with contextlib.suppress(Exception):
                self._serial.close()
            self._serial = None

