"""Text the people responsible when an alarm rises, through a GSM/4G modem on a serial port (AT commands,
PDU mode, UCS-2 so that Chinese arrives intact; long texts in concatenated parts).

Who: the site's named persons (a reservoir's administrative, technical and patrol responsible persons, a
chemical park's duty officers). When: an alarm raised or escalated to `level` or more — and, with
`only_when_uplink_down_s`, only when the platform's uplink has been down that long (the platform would
tell them otherwise): an alarm that happened while the link was down is texted once the link has been down
long enough. The same rule at the same level again within `fold_s` is one text, not many; each recipient
gets at most `max_per_hour`. A text the modem refuses is tried again with backoff, `retries` times.
Modem faults (no SIM, no network, no credit, no answer) are gateway faults (`gateway.uplink.sms.<name>`),
cleared when a text goes out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from device_drivers import gsm

from .. import wire
from ..plugins import Table
from .base import UplinkContext

KIND = "sms"

SAMPLE = """\
[[uplinks]]
kind = "sms"
name = "responsible"
port = "/dev/ttyUSB2"          # the modem's AT port
# baudrate = 115200
# pin_file = "/etc/yujing/sim.pin"   # when the SIM asks for a PIN (a file, mode 0600)
level = "III_YELLOW"           # text alarms raised or escalated to this level or more
# only_when_uplink_down_s = 0  # 0: always; N: only while the platform has been unreachable for N s
# fold_s = 600                 # the same rule and level again within this long: no new text
# max_per_hour = 6             # per recipient
# retries = 5                  # a text the modem did not take is tried again this often …
# retry_s = 10                 # … after this long, doubling each time (at most 10 min)
# site_name = "某水库"          # how the texts name the site (default: the site id)
# utc_offset = "+08:00"        # the time of day the texts show
recipients = [
  { name = "张三", role = "行政责任人", number = "+8613800000001" },
  { name = "李四", role = "技术责任人", number = "+8613800000002" },
  { name = "王五", role = "巡查责任人", number = "+8613800000003" },
]
"""

log = logging.getLogger("yujing.uplink.sms")
COLOURS = {1: "蓝色(IV级)", 2: "黄色(III级)", 3: "橙色(II级)", 4: "红色(I级)"}


@dataclass(frozen=True)
class Recipient:
    name: str
    role: str
    number: str


@dataclass(frozen=True, kw_only=True)
class Config:
    kind: ClassVar[str] = KIND
    name: str
    port: str
    baudrate: int = 115200
    pin_file: Path | None = None
    level: int = 2
    only_when_uplink_down_s: float = 0.0
    fold_s: float = 600.0
    max_per_hour: int = 6
    retries: int = 5
    retry_s: float = 10.0
    site_name: str = ""
    utc_offset_min: int = 480
    recipients: tuple[Recipient, ...] = ()
    timeout_s: float = 30.0
    path: str = ""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        from ..rules.levels import Level

        t = Table(raw, path)
        t.string("kind")
        recipients = []
        for i, rt in enumerate(t.tables("recipients")):
            number = rt.string("number")
            try:
                gsm.encode_number(number)
            except ValueError as exc:
                raise rt.error("number", str(exc)) from None
            recipients.append(Recipient(rt.string("name"), rt.string("role", ""), number))
            rt.finish()
        if not recipients:
            raise t.error("recipients", "name at least one recipient")
        pin = t.string("pin_file", None)
        offset = re.match(r"^([+-])(\d{2}):(\d{2})$", t.string("utc_offset", "+08:00"))
        if offset is None:
            raise t.error("utc_offset", 'expected "+HH:MM"')
        config = cls(
            name=t.string("name"), port=t.string("port"), baudrate=t.integer("baudrate", 115200, minimum=1200, maximum=921600),
            pin_file=Path(pin) if pin else None, level=int(t.level("level", Level.III_YELLOW)),
            only_when_uplink_down_s=t.number("only_when_uplink_down_s", 0.0, non_negative=True),
            fold_s=t.number("fold_s", 600.0, non_negative=True), max_per_hour=t.integer("max_per_hour", 6, minimum=1, maximum=100),
            retries=t.integer("retries", 5, minimum=0, maximum=20), retry_s=t.number("retry_s", 10.0, positive=True),
            site_name=t.string("site_name", ""),
            utc_offset_min=(int(offset.group(2)) * 60 + int(offset.group(3))) * (-1 if offset.group(1) == "-" else 1),
            recipients=tuple(recipients), timeout_s=t.number("timeout_s", 30.0, positive=True), path=path,
        )
        t.finish()
        return config

    def with_base(self, base: Path) -> Config:
        """`pin_file` relative to the site file's directory, like every other file the site names."""
        if self.pin_file is None or self.pin_file.is_absolute():
            return self
        return replace(self, pin_file=base / self.pin_file.expanduser())

    def check(self, resolve: Any) -> list[tuple[str, str]]:
        from ..storefiles import secret_file_problem

        problem = None if self.pin_file is None else secret_file_problem(self.pin_file)
        return [] if problem is None else [(f"{self.path}.pin_file", problem)]


class ModemError(Exception):
    """The modem cannot send now; the message says why in words (a SIM, a network, credit, no answer)."""


class Modem:
    """The AT dialogue on a serial port (pyserial, non-blocking, read through the event loop)."""

    def __init__(self, port: str, baudrate: int, timeout_s: float) -> None:
        self.port, self.baudrate, self.timeout_s = port, baudrate, timeout_s
        self._serial: Any = None
        self._lines: asyncio.Queue[str] = asyncio.Queue(maxsize=256)
        self._buf = bytearray()

    def open(self) -> None:
        import serial

        try:
            self._serial = serial.Serial(self.port, self.baudrate, timeout=0, exclusive=True)
        except (OSError, ValueError, serial.SerialException) as exc:
            from device_drivers.base import serial_open_failure

            raise ModemError(serial_open_failure(self.port, exc)) from None
        asyncio.get_running_loop().add_reader(self._serial.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._serial.fileno(), 4096)
        except (BlockingIOError, OSError):
            return
        self._buf += data
        while True:
            if self._buf.startswith(b"> ") or self._buf.startswith(b"\r\n> "):  # the PDU prompt has no line end
                del self._buf[: self._buf.index(b">") + 2]
                self._put(">")
                continue
            i = self._buf.find(b"\r\n")
            if i < 0:
                if len(self._buf) > 4096:
                    self._buf.clear()
                return
            line = self._buf[:i].decode("ascii", "replace").strip()
            del self._buf[: i + 2]
            if line:
                self._put(line)

    def _put(self, line: str) -> None:
        if self._lines.full():
            self._lines.get_nowait()
        self._lines.put_nowait(line)

    def close(self) -> None:
        if self._serial is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._serial.fileno())
            with contextlib.suppress(Exception):
                self._serial.close()
            self._serial = None

    async def command(self, text: str, *, expect_prompt: bool = False, timeout_s: float | None = None) -> list[str]:
        """Send `text` + CR; the lines up to the final result code (or the `>` prompt). Raises ModemError."""
        if self._serial is None:
            self.open()
        while not self._lines.empty():
            self._lines.get_nowait()
        os.write(self._serial.fileno(), text.encode("ascii") + b"\r")
        return await self._until_final(expect_prompt, timeout_s or 5.0, text)

    async def send_pdu(self, pdu_hex: str) -> list[str]:
        os.write(self._serial.fileno(), pdu_hex.encode("ascii") + gsm.CTRL_Z)
        return await self._until_final(False, self.timeout_s, "the PDU")

    async def _until_final(self, expect_prompt: bool, timeout_s: float, what: str) -> list[str]:
        lines: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = deadline - loop.time()
            try:
                line = await asyncio.wait_for(self._lines.get(), max(left, 0.001))
            except TimeoutError:
                raise ModemError(f"no answer to {what} within {timeout_s:g} s (is the modem powered? the right port?)") from None
            if expect_prompt and line == ">":
                return lines
            if line in ("RING", "NO CARRIER") or line.startswith(("+CMTI", "+CDSI", "^")):
                continue  # unsolicited
            if gsm.FINAL.match(line):
                if line != "OK":
                    raise ModemError(gsm.explain(line))
                return lines
            lines.append(line)


@dataclass
class _Text:
    recipient: Recipient
    text: str
    tries: int = 0
    not_before: float = 0.0


class SmsUplink:
    def __init__(self, config: Config, ctx: UplinkContext) -> None:
        self.config = config
        self.ctx = ctx
        self.events = ctx.subscribe()
        self.modem = Modem(config.port, config.baudrate, config.timeout_s)
        self.queue: deque[_Text] = deque(maxlen=200)
        # alarms for when the platform has been away long enough, with when they came (monotonic)
        self.waiting: deque[tuple[wire.Event, float]] = deque(maxlen=50)
        self._down: tuple[int, float] | None = None  # the uplink's down_since_ms, and it on the monotonic clock
        self._folded: dict[tuple[str, int], float] = {}
        self._sent_at: dict[str, deque[float]] = {r.number: deque() for r in config.recipients}
        self._ready = False
        self._reference = 0
        self.sent = 0  # message parts the modem took (+CMGS)
        self.sent_at: list[float] = []  # monotonic times of +CMGS, for the latency bench
        self.folded = 0
        self.rate_limited = 0
        self.fault: str | None = None
        self.source = f"uplink.sms.{config.name}"

    # ---------------------------------------------------------- deciding

    def _wanted(self, e: wire.Event) -> bool:
        return e.kind in ("raised", "escalated") and e.new_level >= self.config.level

    def _on_monotonic(self, ts_ms: int) -> float:
        """A wall-clock instant of the recent past on the monotonic clock, read once: a later step of the wall
        clock (NTP) then moves neither how long the platform has been away nor which alarms came after."""
        clock = self.ctx.clock
        return clock.monotonic() - max(0, clock.time_ms() - ts_ms) / 1000

    def _platform_away(self, event_mono: float) -> bool:
        limit = self.config.only_when_uplink_down_s
        if limit <= 0:
            return True
        main = self.ctx.main
        since = main.down_since_ms
        if main.connected or since is None:
            self._down = None
            return False
        if self._down is None or self._down[0] != since:
            self._down = (since, self._on_monotonic(since))
        down = self._down[1]
        return event_mono >= down and self.ctx.clock.monotonic() - down >= limit

    def _text(self, e: wire.Event) -> str:
        site = self.config.site_name or self.ctx.site
        when = time.strftime("%m-%d %H:%M", time.gmtime(e.ts_ms // 1000 + self.config.utc_offset_min * 60))
        values = []
        for point, value in e.values.items():
            info = self.ctx.catalogue[point] if 0 <= point < len(self.ctx.catalogue) else None
            name = f"{info.device}.{info.name}" if info else str(point)
            values.append(f"{name}={wire.json_value(value, info.type if info else None)}{info.unit if info else ''}")  # no float32 noise
        verb = "升级为" if e.kind == "escalated" else ""
        return (f"【预警】{site} {e.rule} {verb}{COLOURS.get(e.new_level, e.new_level)}预警"
                + (f"：{'，'.join(values)}" if values else "") + f"（{when}，网关 {self.ctx.gateway}）")

    def _take(self, e: wire.Event) -> None:
        now = self.ctx.clock.monotonic()
        key = (e.rule, e.new_level)
        if now - self._folded.get(key, -1e18) < self.config.fold_s:
            self.folded += 1
            return
        self._folded[key] = now
        text = self._text(e)
        for r in self.config.recipients:
            self.queue.append(_Text(r, text))
        log.warning("%s: %s → %d recipients: %s", self.config.name, e.rule, len(self.config.recipients), text)

    def _allowed(self, r: Recipient) -> bool:
        now = self.ctx.clock.monotonic()
        times = self._sent_at[r.number]
        while times and now - times[0] > 3600:
            times.popleft()
        if len(times) >= self.config.max_per_hour:
            return False
        times.append(now)
        return True

    # ---------------------------------------------------------- sending

    async def _prepare(self) -> None:
        """Check and set the modem up: it answers, the SIM is ready (PIN if asked), it is registered, PDU mode."""
        m = self.modem
        await m.command("AT")
        await m.command("ATE0")
        with contextlib.suppress(ModemError):
            await m.command("AT+CMEE=1")
        pin = " ".join(await m.command("AT+CPIN?"))
        if "SIM PIN" in pin:
            if self.config.pin_file is None:
                raise ModemError("the SIM asks for a PIN and no pin_file is configured")
            code = self.config.pin_file.read_text(encoding="utf-8").strip()
            await m.command(f'AT+CPIN="{code}"')
        elif "READY" not in pin:
            raise ModemError(f"SIM not ready: {pin or 'no answer'}")
        reg = " ".join(await m.command("AT+CREG?"))
        if not gsm.registered(reg):
            raise ModemError(f"not registered on a network: {reg or 'no answer'} (antenna? coverage?)")
        await m.command("AT+CMGF=0")
        self._ready = True

    async def _send(self, item: _Text) -> None:
        self._reference = (self._reference + 1) % 256
        for pdu in gsm.encode_submit(item.recipient.number, item.text, reference=self._reference):
            await self.modem.command(f"AT+CMGS={pdu.tpdu_length}", expect_prompt=True, timeout_s=10)
            lines = await self.modem.send_pdu(pdu.hex)
            if not any(line.startswith("+CMGS") for line in lines):
                raise ModemError("the modem said OK without +CMGS")
            self.sent += 1
            self.sent_at.append(time.monotonic())

    def _failed(self, why: str) -> None:
        self.ctx.health.fault(self.source, f"{self.config.name}: modem {self.config.port}: {why}")  # one event; the text follows
        self.fault = why

    def _recovered(self) -> None:
        if self.fault is not None:
            self.ctx.health.ok(self.source, f"{self.config.name}: texts go out again")
        self.fault = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._once(stop)
        finally:
            self.modem.close()

    async def _once(self, stop: asyncio.Event) -> None:
        while not self.events.empty():
            e = self.events.get_nowait()
            if self._wanted(e):
                came = self._on_monotonic(e.ts_ms)
                (self._take(e) if self._platform_away(came) else self.waiting.append((e, came)))
        for e, came in list(self.waiting):
            if self._platform_away(came):
                self.waiting.remove((e, came))
                self._take(e)
        now = self.ctx.clock.monotonic()
        item = next((q for q in self.queue if q.not_before <= now), None)
        if item is None:
            event = asyncio.ensure_future(self.events.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({event, stopper}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if event in done:
                self.events.put_nowait(event.result())
            else:
                event.cancel()
            return
        self.queue.remove(item)
        if not self._allowed(item.recipient):
            self.rate_limited += 1
            log.warning("%s: %s (%s) already got %d texts this hour; not texted: %s", self.config.name, item.recipient.name,
                        item.recipient.role, self.config.max_per_hour, item.text)
            return
        try:
            if not self._ready:
                await self._prepare()
            await self._send(item)
        except (ModemError, OSError) as exc:
            self._ready = False
            self.modem.close()
            self._failed(str(exc))
            item.tries += 1
            # A SIM can be put in, credit topped up, the antenna fixed: every text is tried `retries` times.
            if item.tries <= self.config.retries:
                item.not_before = self.ctx.clock.monotonic() + min(self.config.retry_s * 2 ** (item.tries - 1), 600)
                self.queue.appendleft(item)
                # it was counted against the rate limit; give the slot back
                with contextlib.suppress(IndexError):
                    self._sent_at[item.recipient.number].pop()
            else:
                log.error("%s: text to %s given up after %d tries: %s", self.config.name, item.recipient.name, item.tries, exc)
            await self.ctx.clock.sleep(0.5)
            return
        self._recovered()
        log.info("%s: texted %s (%s, %s)", self.config.name, item.recipient.name, item.recipient.role, item.recipient.number)
