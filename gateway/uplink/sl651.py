"""The gateway as an SL 651-2014 station: it reports chosen points to a water authority's centre over TCP,
beside (never instead of) the Yujing platform.

    timed report (32H)   every `timed_interval_s`, on the clock (on the hour for 3600), all elements
    added report (33H)   when an alarm on a reported point rises to `add_level` or more: that element first
    query (37H)          the centre asks; the current values are the answer
    keep-alive (2FH)     every `keepalive_s` while connected (the last serial, not incremented)

Reports are made on time whatever the link does, with the values and the observation time of that moment,
and wait in an outbox (at most `backlog` reports, the oldest dropped first and counted) until the centre
confirms them, oldest first (M2). A report without a confirm within `confirm_timeout_s` is sent again, at
most `resends` times; then the link is closed (§6.3.2.3: quit after three failures) and reopened with
backoff, and the report is sent again on the new link. A reading that is missing or not good goes as "no
value" (all F). The outbox lives in memory: a restart of the gateway loses what it held (counted in the
log). It reads the gateway's newest values and alarm events only (gateway.uplink.base).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from device_drivers import sl651
from device_drivers.drivers.sl651 import local_time

from ..model import Quality
from ..plugins import FieldError, Table
from .base import UplinkContext

KIND = "sl651"

SAMPLE = """\
[[uplinks]]
kind = "sl651"
name = "water-authority"
centre = "10.20.30.40:5005"   # the centre's host:port
centre_address = 1            # its SL 651 address, 1..255
station = "0053010001"        # this gateway's station address, 10 hex digits
password = "1234"             # 4 hex digits, as the centre set it
station_class = "K"           # Appendix A: "K" reservoir, "H" river, "P" rain, "Z" sluice, …
# timed_interval_s = 3600     # 32H timed reports, on the clock
# keepalive_s = 40            # 2FH while connected; 0: none
# add_level = "IV_BLUE"       # 33H when an alarm on a reported point reaches this level or more
# utc_offset = "+08:00"       # the time the reports carry (Beijing time)
# confirm_timeout_s = 10
# resends = 2                 # M2: at most 2 resends without a confirm, then the link is reopened
# backlog = 240               # reports kept while the centre is unreachable (10 days of hourly reports)
# fault_after_s = 300         # unreachable this long, or a report not confirmed: a gateway fault on the platform
elements = [
  { element = "ZU", point = "radar.level" },
  { element = "PJ", point = "rain.today" },
  { element = "VT", point = "ups.voltage" },
]
"""

log = logging.getLogger("yujing.uplink.sl651")
CLASSES = {"P": 0x50, "H": 0x48, "K": 0x4B, "Z": 0x5A, "D": 0x44, "T": 0x54, "M": 0x4D, "G": 0x47, "Q": 0x51, "I": 0x49, "O": 0x4F}
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")


@dataclass(frozen=True, kw_only=True)
class Config:
    kind: ClassVar[str] = KIND
    name: str
    centre: tuple[str, int]
    centre_address: int
    station: str
    password: int
    station_class: int
    timed_interval_s: float = 3600.0
    keepalive_s: float = 40.0
    add_level: int = 1
    utc_offset_min: int = 480
    confirm_timeout_s: float = 10.0
    resends: int = 2
    backlog: int = 240
    fault_after_s: float = 300.0
    elements: tuple[tuple[int, str], ...] = ()  # (element id, point name)
    path: str = ""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        from ..rules.levels import Level

        t = Table(raw, path)
        t.string("kind")
        name = t.string("name")
        centre = t.string("centre")
        host, _, port = centre.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise t.error("centre", f'expected "HOST:PORT", got {centre!r}')
        station = t.string("station")
        if not re.fullmatch(r"[0-9A-Fa-f]{10}", station):
            raise t.error("station", "10 hex digits, e.g. \"0053010001\"")
        password = t.string("password")
        if not re.fullmatch(r"[0-9A-Fa-f]{4}", password):
            raise t.error("password", "4 hex digits")
        klass = t.string("station_class")
        if klass.upper() not in CLASSES:
            raise t.error("station_class", f"one of {', '.join(CLASSES)}")
        offset_text = t.string("utc_offset", "+08:00")
        m = _OFFSET.match(offset_text)
        if not m:
            raise t.error("utc_offset", 'expected "+HH:MM"')
        level = t.level("add_level", Level.IV_BLUE)
        elements = []
        for i, et in enumerate(t.tables("elements")):
            ref = et.string("element")
            el = sl651.element(ref)
            if el is None or el.encoding in ("drp", "drz"):
                raise et.error("element", f"no single-value element {ref!r} in the SL 651 table")
            point = et.string("point")
            et.finish()
            elements.append((el.id, point))
        if not elements:
            raise t.error("elements", "report at least one element")
        config = cls(
            name=name, centre=(host, int(port)), centre_address=t.integer("centre_address", minimum=1, maximum=255),
            station=station.upper(), password=int(password, 16), station_class=CLASSES[klass.upper()],
            timed_interval_s=t.number("timed_interval_s", 3600.0, positive=True), keepalive_s=t.number("keepalive_s", 40.0, non_negative=True),
            add_level=int(level), utc_offset_min=(int(m.group(2)) * 60 + int(m.group(3))) * (-1 if m.group(1) == "-" else 1),
            confirm_timeout_s=t.number("confirm_timeout_s", 10.0, positive=True), resends=t.integer("resends", 2, minimum=0, maximum=5),
            backlog=t.integer("backlog", 240, minimum=1, maximum=10_000), fault_after_s=t.number("fault_after_s", 300.0, positive=True),
            elements=tuple(elements), path=path,
        )
        t.finish()
        return config

    def check(self, resolve: Any) -> list[tuple[str, str]]:
        problems = []
        for i, (_, point) in enumerate(self.elements):
            try:
                resolve(point)
            except KeyError as exc:
                problems.append((f"{self.path}.elements[{i}].point", str(exc.args[0]) if exc.args else f"no point {point!r}"))
        return problems


class SL651Uplink:
    def __init__(self, config: Config, ctx: UplinkContext) -> None:
        self.config = config
        self.ctx = ctx
        self.points = [(ident, ctx.resolve(name)) for ident, name in config.elements]
        self.events = ctx.subscribe()  # from the start: alarms while the link is down are not missed
        self.serial = 0
        self.sent = {"timed": 0, "added": 0, "query": 0, "confirmed": 0, "given_up": 0, "dropped": 0}
        self.outbox: deque[tuple[int, int, bytes]] = deque()  # (function, serial, frame), oldest first
        self._queued = asyncio.Event()
        self._confirms: dict[tuple[int, int], asyncio.Future[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self.source = f"uplink.sl651.{config.name}"
        self._down_since: float | None = None  # monotonic: since when no centre took our reports

    # ---------------------------------------------------------- reports

    def _next_serial(self) -> int:
        self.serial = self.serial % 65535 + 1
        return self.serial

    def _now(self) -> sl651.Time:
        return local_time(self.ctx.clock.time_ms(), self.config.utc_offset_min)

    def _values(self, first: int | None = None) -> list[tuple[int, sl651.Time, Any]]:
        observed = self._now()[:5] + (0,)
        out = []
        for ident, point in sorted(self.points, key=lambda p: p[0] != first):
            r = self.ctx.latest.get(point)
            value = r.value if r is not None and r.quality == Quality.GOOD else None
            if isinstance(value, bool):
                value = int(value)
            out.append((ident, observed, value if isinstance(value, (int, float, Decimal)) or value is None else None))
        return out

    def _frame(self, function: int, body: bytes, end: int = sl651.ETX) -> bytes:
        c = self.config
        return sl651.encode_frame(sl651.Frame(True, c.centre_address, c.station, c.password, function, body, end))

    def _report_body(self, serial: int, first: int | None = None) -> bytes:
        values = self._values(first)
        observed = values[0][1] if values else self._now()
        report = sl651.Report(serial, self._now(), self.config.station, self.config.station_class, observed, tuple(values))
        try:
            return sl651.encode_report(report)
        except sl651.SL651Error as exc:  # a value too large for its element: send it as "no value", say why
            log.warning("%s: %s", self.config.name, exc)
            safe = tuple((i, t, None if _too_big(i, v) else v) for i, t, v in values)
            return sl651.encode_report(sl651.Report(serial, report.sent, report.station, report.station_class, observed, safe))

    def _queue(self, function: int, first: int | None = None) -> None:
        """A report made now, with the values of now, to be sent when the centre can take it."""
        serial = self._next_serial()
        if len(self.outbox) >= self.config.backlog:
            dropped = self.outbox.popleft()
            self.sent["dropped"] += 1
            log.warning("%s: %d reports wait for the centre; the oldest (%s serial %d) is dropped", self.config.name,
                        len(self.outbox) + 1, sl651.FUNCTION_NAMES[dropped[0]], dropped[1])
        self.outbox.append((function, serial, self._frame(function, self._report_body(serial, first))))
        self.sent["timed" if function == sl651.F_TIMED else "added"] += 1
        self._queued.set()

    async def _send_confirmed(self, function: int, serial: int, frame: bytes) -> bool:
        for attempt in range(1 + self.config.resends):
            if self._writer is None:
                return False
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._confirms[(function, serial)] = future
            self._writer.write(frame)
            await self._writer.drain()
            try:
                await asyncio.wait_for(future, self.config.confirm_timeout_s)
                self.sent["confirmed"] += 1
                self._healthy()
                return True
            except TimeoutError:
                log.info("%s: no confirm for %s serial %d (attempt %d)", self.config.name,
                         sl651.FUNCTION_NAMES[function], serial, attempt + 1)
            finally:
                self._confirms.pop((function, serial), None)
        self.sent["given_up"] += 1
        log.warning("%s: %s serial %d not confirmed after %d sends; reconnecting, it stays first in line", self.config.name,
                    sl651.FUNCTION_NAMES[function], serial, 1 + self.config.resends)
        self._unhealthy(f"the centre does not confirm {sl651.FUNCTION_NAMES[function]} serial {serial}")
        return False

    # ---------------------------------------------------------- faults

    def _unhealthy(self, why: str) -> None:
        """A gateway fault once the water authority has gone without our reports for `fault_after_s`."""
        now = self.ctx.clock.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= self.config.fault_after_s or why.startswith("the centre does not confirm"):
            host, port = self.config.centre
            self.ctx.health.fault(self.source, f"{self.config.name}: SL 651 centre {host}:{port}: {why}; "
                                               f"{len(self.outbox)} reports waiting")

    def _healthy(self) -> None:
        self._down_since = None
        self.ctx.health.ok(self.source, f"{self.config.name}: the centre confirms reports again")

    # ---------------------------------------------------------- making reports, link or no link

    async def _produce(self, stop: asyncio.Event) -> None:
        clock = self.ctx.clock
        step = int(self.config.timed_interval_s * 1000)
        next_timed = (clock.time_ms() // step + 1) * step
        while not stop.is_set():
            event = asyncio.ensure_future(self.events.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({event, stopper}, timeout=max(0.0, (next_timed - clock.time_ms()) / 1000),
                                         return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if event in done:
                first = self._trigger(event.result())
                if first is not None:
                    self._queue(sl651.F_ADDED, first)
            else:
                event.cancel()
            if clock.time_ms() >= next_timed:
                next_timed += step * max(1, (clock.time_ms() - next_timed) // step + 1)  # a late wake-up skips, not floods
                self._queue(sl651.F_TIMED)

    def _trigger(self, event: Any) -> int | None:
        """An alarm event: a reported point's alarm rising to add_level or more makes an added report (33H)
        with that element first."""
        if event.kind not in ("raised", "escalated") or event.new_level < self.config.add_level:
            return None
        for ident, point in self.points:
            if point in event.values or event.rule in self.ctx.rules_on_point(point):
                return ident
        return None

    # ---------------------------------------------------------- the link

    async def run(self, stop: asyncio.Event) -> None:
        producer = asyncio.ensure_future(self._produce(stop))
        try:
            await self._link(stop)
        finally:
            producer.cancel()
            if self.outbox:
                log.warning("%s: stopping with %d reports not confirmed by the centre (they are lost)", self.config.name,
                            len(self.outbox))

    async def _link(self, stop: asyncio.Event) -> None:
        delay = 1.0
        while not stop.is_set():
            host, port = self.config.centre
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            except (OSError, TimeoutError) as exc:
                log.info("%s: centre %s:%d unreachable (%s); retrying in %.0f s; %d reports waiting", self.config.name, host,
                         port, exc, delay, len(self.outbox))
                self._unhealthy(f"unreachable ({exc or type(exc).__name__})")
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, 60.0)
                continue
            self._writer = writer
            log.info("%s: connected to centre %s:%d", self.config.name, host, port)
            listener = asyncio.ensure_future(self._listen(reader))
            try:
                if await self._serve(stop, listener):
                    delay = 1.0
            except (ConnectionError, OSError) as exc:
                log.warning("%s: centre link lost: %s", self.config.name, exc)
            finally:
                self._writer = None
                listener.cancel()
                with contextlib.suppress(Exception):
                    writer.close()
            if not stop.is_set():
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, 60.0)

    async def _serve(self, stop: asyncio.Event, listener: asyncio.Future[None]) -> bool:
        """Send the outbox, oldest first, and keep the link alive; False when the centre stopped confirming."""
        clock = self.ctx.clock
        next_beat = clock.monotonic() + self.config.keepalive_s if self.config.keepalive_s else None
        confirmed_any = False
        while not stop.is_set() and not listener.done():
            while self.outbox and self._writer is not None:
                function, serial, frame = self.outbox[0]
                if not await self._send_confirmed(function, serial, frame):
                    return confirmed_any
                confirmed_any = True
                if self.outbox and self.outbox[0][1] == serial:
                    self.outbox.popleft()
            self._queued.clear()
            waits = [3600.0]
            if next_beat is not None:
                waits.append(max(0.0, next_beat - clock.monotonic()))
            queued = asyncio.ensure_future(self._queued.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({queued, stopper, listener}, timeout=min(waits), return_when=asyncio.FIRST_COMPLETED)
            queued.cancel()
            stopper.cancel()
            if next_beat is not None and clock.monotonic() >= next_beat and self._writer is not None:
                self._writer.write(self._frame(sl651.F_KEEPALIVE, sl651.encode_short_body(max(self.serial, 1), self._now())))
                await self._writer.drain()
                next_beat = clock.monotonic() + self.config.keepalive_s
        return True

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        deframer = sl651.Deframer()
        while data := await reader.read(4096):
            for f in deframer.feed(data):
                if f.up or f.station != self.config.station:
                    continue
                if f.function == sl651.F_QUERY:
                    self.sent["query"] += 1
                    if self._writer is not None:
                        self._writer.write(self._frame(sl651.F_QUERY, self._report_body(self._next_serial())))
                        await self._writer.drain()
                    continue
                with contextlib.suppress(sl651.SL651Error):
                    serial, _ = sl651.decode_short_body(f.body)
                    future = self._confirms.get((f.function, serial))
                    if future is not None and not future.done():
                        future.set_result(None)


def _too_big(ident: int, value: Any) -> bool:
    try:
        sl651.encode_element(ident, value)
        return False
    except sl651.SL651Error:
        return True


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


__all__ = ["KIND", "SAMPLE", "Config", "SL651Uplink", "FieldError"]
