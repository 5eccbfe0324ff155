"""Fuzz targets: each feeds generated and mutated inputs to one untrusted-input path and counts crashes —
any exception other than the path's documented error type (or any exception at all, where none is
documented). A target returns a Report; fuzz/run.py runs each in a process of its own (for its peak memory).

    target              documented errors
    commands            none: CommandInbox.handle answers (or stays silent), never raises
    wire.<decoder>      gateway.wire.WireError
    feed, feed+schema   none: Decoder.feed turns anything into records or notices
    config              gateway.config.ConfigError
    modbus.tcp          DeviceError, TransportError (reply frames from a server that lies)
    modbus.rtu          DeviceError, TransportError (garbage around and instead of replies on a pty)
    serial_line         LineError (a stream cut anywhere: the framer, the NMEA frame, fields, values)
    sl651.centre        none: the centre driver turns any byte stream into readings, confirms or refusals
    sl651.station       none: the station uplink's listener, fed by a lying centre
    node.mqtt           MQTTError (under real MicroPython: fuzz/node_mqtt.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_780_000_000_000


@dataclass
class Report:
    target: str
    inputs: int = 0
    crashes: int = 0
    examples: list[str] = field(default_factory=list)  # the first crashes: exception and input (hex, cut)
    timeouts: int = 0  # transport targets: inputs that ended in the protocol's own timeout (not counted as slow)
    slowest_ms: float = 0.0  # pure targets: the 50 slowest inputs re-timed (median of 5), so a GC pause is not "an input"
    slowest_input: str = ""
    observed_max_ms: float = 0.0  # the longest single call seen, noise included
    p999_ms: float = 0.0  # 99.9th percentile of every timed input
    _times: list[float] = field(default_factory=list, repr=False)
    peak_rss_mb: float = 0.0
    seconds: float = 0.0

    def crash(self, exc: BaseException, data: bytes | str) -> None:
        self.crashes += 1
        if len(self.examples) < 3:
            shown = data[:80].hex() if isinstance(data, bytes) else repr(data[:200])
            self.examples.append(f"{type(exc).__name__}: {str(exc)[:120]} <- {shown}")

    def timed(self, started_ns: int, data: bytes | str) -> float:
        ms = (time.perf_counter_ns() - started_ns) / 1e6
        self.observed_max_ms = max(self.observed_max_ms, ms)
        self._times.append(ms)
        if ms > self.slowest_ms:
            self.slowest_ms = ms
            self.slowest_input = (data[:40].hex() if isinstance(data, bytes) else repr(data[:80])) + f" ({len(data)} bytes)"
        return ms


def _finish(report: Report, started: float) -> Report:
    report.seconds = time.monotonic() - started
    if report._times:
        ordered = sorted(report._times)
        report.p999_ms = ordered[min(len(ordered) - 1, int(len(ordered) * 0.999))]
    report._times = []
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


# ---------------------------------------------------------------------------------------------- pure targets


WARMUP = 20  # inputs run first and not timed: one-time imports and caches are not a property of an input
RETIME = 50  # the slowest inputs timed again (median of 5) to tell an input's cost from a pause of the machine


def _pure(name: str, n: int, seed: int, make: Callable[[random.Random], bytes | str], call: Callable[[Any], Any],
          allowed: tuple[type[BaseException], ...]) -> Report:
    rng = random.Random(seed)
    report, started = Report(name), time.monotonic()
    for _ in range(WARMUP):
        try:
            call(make(random.Random(-seed - 1)))
        except BaseException:  # noqa: BLE001 - warm-up only; the counted run below sees every input
            pass
    slow: list[tuple[float, Any]] = []
    for _ in range(n):
        data = make(rng)
        report.inputs += 1
        t = time.perf_counter_ns()
        try:
            call(data)
        except allowed:
            pass
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a crash is any other exception, panics included
            report.crash(exc, data)
        ms = report.timed(t, data)
        if len(slow) < RETIME or ms > slow[-1][0]:
            slow = sorted([*slow, (ms, data)], key=lambda x: -x[0])[:RETIME]
    report.slowest_ms, report.slowest_input = 0.0, ""
    for _, data in slow:  # each of the slowest again, five times: its cost, not the machine's hiccup
        times = []
        for _ in range(5):
            t = time.perf_counter_ns()
            try:
                call(data)
            except BaseException:  # noqa: BLE001 - counted above
                pass
            times.append((time.perf_counter_ns() - t) / 1e6)
        median = sorted(times)[2]
        if median > report.slowest_ms:
            shown = data[1] if isinstance(data, tuple) else data
            report.slowest_ms = median
            report.slowest_input = (shown[:40].hex() if isinstance(shown, bytes) else repr(shown[:80])) + f" ({len(shown)} bytes)"
    return _finish(report, started)


def wire_target(decoder: str) -> Callable[[int, int], Report]:
    from fuzz.generate import cbor_input, valid_messages
    from gateway import wire

    kinds = {"decode_data": "data", "decode_birth": "birth", "decode_death": "death", "decode_alarm": "alarm",
             "decode_alarms": "alarms", "decode_reply": "reply"}

    def run(n: int, seed: int) -> Report:
        corpus: list[bytes] = []

        def make(rng: random.Random) -> bytes:
            valid = dict(valid_messages(rng))[kinds[decoder]] if rng.random() < 0.5 or not corpus else rng.choice(corpus)
            if len(corpus) < 200:
                corpus.append(valid)
            return cbor_input(rng, valid, corpus)

        return _pure(f"wire.{decoder}", n, seed, make, getattr(wire, decoder), (wire.WireError,))

    return run


def feed_target(schema: bool) -> Callable[[int, int], Report]:
    def run(n: int, seed: int) -> Report:
        from fuzz.generate import cbor_input, valid_messages
        from gateway.consumer import Decoder, load_schema

        validator = load_schema() if schema else None
        decoder = Decoder(validate=validator.validate_cbor if validator is not None else None)
        corpus: list[bytes] = []
        topics = [f"yujing/v1/S/g/{k}" for k in ("data", "birth", "death", "alarm", "alarms", "reply", "cmd")]

        def make(rng: random.Random) -> tuple[str, bytes]:
            kind, valid = rng.choice(valid_messages(rng))
            if len(corpus) < 200:
                corpus.append(valid)
            topic = f"yujing/v1/S/g/{kind}" if rng.random() < 0.8 else rng.choice(topics + ["", "a/b", "x" * 300, "yujing/v1/S/g/h/data"])
            return topic, cbor_input(rng, valid, corpus)

        def call(item: tuple[str, bytes]) -> None:
            res = decoder.feed(*item)
            if not isinstance(res.records, list):  # pragma: no cover - the contract
                raise AssertionError("feed returned no records list")

        report = _pure("feed+schema" if schema else "feed", n, seed, make, call, ())
        report.slowest_input = report.slowest_input.replace("(", "(topic, payload: ", 1)
        return report

    return run


def commands_target(n: int, seed: int) -> Report:
    import tempfile

    import cbor2

    from fuzz.generate import cbor_input, random_item
    from gateway import commands, wire
    from gateway.command_inbox import CommandInbox
    from gateway.commands import Keyring, ReplayStore

    tmp = Path(tempfile.mkdtemp())
    commands.new_key_pair(tmp / "k")
    key = commands.load_private_key(tmp / "k")
    replay = ReplayStore(tmp / "c.json")

    class Clock:
        def time_ms(self) -> int:
            return T0

        def monotonic(self) -> float:
            return 0.0

        async def sleep(self, s: float) -> None:
            return None

    async def save(counters):  # type: ignore[no-untyped-def]
        replay.counters = dict(counters)

    inbox = CommandInbox(Keyring([key.public_key()]), replay, site="S", gateway="g", clock=Clock(),
                         execute=lambda c: (True, "done"), save_counters=save, reject_burst=10**9)
    signed = [commands.sign_command(key, site="S", gateway="g", command="ack", rule=f"r{i}", by="li", request_id=f"id{i}",
                                    ts_ms=T0, counter=i + 1) for i in range(50)]

    def make(rng: random.Random) -> bytes:
        r = rng.random()
        if r < 0.15:  # a well-formed envelope around a random payload, correctly signed: the payload parser's turn
            payload = cbor2.dumps(random_item(rng)) if rng.random() < 0.5 else cbor_input(rng, cbor2.loads(rng.choice(signed)).value[2], signed)
            kid = commands.kid_of(commands.public_raw(key.public_key()))
            protected = cbor2.dumps({1: -8, 4: kid}, canonical=True)
            sig = key.sign(cbor2.dumps(["Signature1", protected, b"", payload], canonical=True))
            return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, sig]), canonical=True)
        return cbor_input(rng, rng.choice(signed), signed)

    loop = asyncio.new_event_loop()

    def call(data: bytes) -> None:
        reply = loop.run_until_complete(inbox.handle(data, retained=False))
        if reply is not None:
            wire.decode_reply(reply)
            if len(reply) > 2048:
                raise AssertionError(f"a {len(reply)}-byte reply")

    try:
        return _pure("commands", n, seed, make, call, ())
    finally:
        loop.close()


def config_target(n: int, seed: int) -> Report:
    from fuzz.generate import mutate_text
    from gateway.config import ConfigError, parse

    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.toml"))]
    base = ROOT / "examples"

    def make(rng: random.Random) -> str:
        return mutate_text(rng, rng.choice(texts))

    return _pure("config", n, seed, make, lambda text: parse(text, "fuzz.toml", base=base), (ConfigError,))


# ---------------------------------------------------------------------------------------------- line protocols


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Refusal logs are rate-limited in the gateway; a fuzz run still need not print them."""
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)


def _fuzz_site(body: str) -> Any:
    from gateway.config import parse

    text = f"""
[site]
id = "FUZZ-01"
gateway = "gw1"
[uplink]
host = "127.0.0.1"
tls = false
[spool]
path = "/nonexistent/spool.db"
{body}
"""
    return parse(text, "fuzz.toml", base=ROOT)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """The same bytes as a serial port or a socket may hand them over: in pieces of any size."""
    out, i = [], 0
    while i < len(data):
        n = rng.choice((1, 2, 7, 64, 4096))
        out.append(data[i : i + n])
        i += n
    return out


SERIAL_LINE_SITE = r"""
[[buses]]
name = "wind"
type = "serial_line"
port = "/dev/ttyFUZZ0"
[[devices]]
name = "wind"
bus = "wind"
interval_s = 1
mode = "stream"
start = "$"
checksum = "nmea"
separator = ","
valid = { field = 5, equals = "A" }
  [[devices.points]]
  name = "direction"
  field = 1
  min = 0
  max = 360
  [[devices.points]]
  name = "speed"
  field = 3
[[buses]]
name = "laser"
type = "serial_line"
port = "/dev/ttyFUZZ1"
[[devices]]
name = "laser"
bus = "laser"
interval_s = 1
mode = "poll"
command = "D\r\n"
pattern = '(?P<dist>[-+0-9.]+) ?m(, ?(?P<q>[0-9]+))?'
  [[devices.points]]
  name = "distance"
  group = "dist"
  scale = 1000
  unit = "mm"
  [[devices.points]]
  name = "quality"
  group = "q"
  type = "int"
"""

SL651_CENTRE_SITE = """
[[buses]]
name = "hydro"
type = "sl651"
listen = "127.0.0.1:5005"
centre = 1
[[devices]]
name = "rtu"
bus = "hydro"
station = "0053010001"
interval_s = 3600
  [[devices.points]]
  name = "ZU"
  element = "ZU"
  [[devices.points]]
  name = "PJ"
  element = "PJ"
  [[devices.points]]
  name = "alarm"
  element = "ZT"
  bit = 2
"""


def serial_line_target(n: int, seed: int) -> Report:
    from device_drivers.drivers.serial_line import _values
    from device_drivers.lines import LineError, LineFramer, nmea_checksum
    from device_drivers.model import Quality
    from gateway.sim.stations import mwv_sentence

    cfg = _fuzz_site(SERIAL_LINE_SITE)
    devices = list(cfg.devices)
    good = [mwv_sentence(d, s) for d, s in ((0, 0), (359.9, 60.1), (45, 8.7))]
    body = "IIMWV,045.0,R,-0000000000000008.7,M,V"
    good += [f"${body}*{nmea_checksum(body)}\r\n".encode(), b"12.345 m, 0099\r\n", b"-0.001m\r\n", b"1e999 m\r\n"]

    def make(rng: random.Random) -> tuple[int, list[bytes]]:
        from fuzz.generate import mutate

        stream = b"".join(mutate(rng, rng.choice(good), good) if rng.random() < 0.7 else rng.choice(good) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.2:
            stream = rng.randbytes(rng.randint(0, 600)) + stream  # a wrong baud rate, noise
        return rng.randrange(len(devices)), _chunks(rng, stream)

    def call(item: tuple[int, list[bytes]]) -> None:
        device = devices[item[0]]
        framer = LineFramer(device.spec.terminator, device.spec.max_line)
        for chunk in item[1]:
            for line in framer.feed(chunk):
                if isinstance(line, bytes):
                    try:
                        results = _values(device, device.spec.format.fields(line))
                    except LineError:
                        continue
                    for value, quality in results:
                        if quality == Quality.GOOD and value is not None and not isinstance(value, (bool, int)) and not value.is_finite():
                            raise AssertionError(f"a good reading of {value}")
            if framer.pending > device.spec.max_line + len(device.spec.terminator):
                raise AssertionError(f"{framer.pending} bytes held")

    with _quiet():
        return _pure("serial_line", n, seed, make, call, ())


def _sl651_inputs(station: str) -> tuple[list[bytes], Callable[[random.Random], bytes]]:
    from device_drivers import sl651
    from fuzz.generate import mutate

    vectors = [bytes.fromhex(h) for h in (
        "7E7E010053010001123432002B020001250715080000F1F100530100014BF0F02507150800201900012526190035603B23019523843812126803FA37",
        "7E7E0100530100011234330027020002250715081512F1F100530100014BF0F025071508153B230195412045200000000438121261036054",
        "7E7E010010100001A00032002B02000C200724172349F1F1001010000148F0F020072417232019000130221900004039230000055038121268038397",
    )]
    frames = [sl651.decode_frame(v) for v in vectors]
    packets = [sl651.encode_frame(p) for f in frames[:2] for p in sl651.split_packets(f, 9)]
    corpus = vectors + packets

    def reframed(rng: random.Random) -> bytes:
        """A valid frame around a mutated body (the CRC made right): the body parser's turn."""
        f = rng.choice(frames)
        body = mutate(rng, f.body, [x.body for x in frames])[: sl651.MAX_BODY]
        function = f.function if rng.random() < 0.8 else rng.choice((0x2F, 0x30, 0x31, 0x33, 0x34, 0x37, 0x3A, 0xE0, 0xFF))
        return sl651.encode_frame(sl651.Frame(f.up, f.centre, station if rng.random() < 0.9 else f.station, f.password, function, body, f.end))

    def make(rng: random.Random) -> bytes:
        r = rng.random()
        if r < 0.4:
            return b"".join(reframed(rng) for _ in range(rng.randint(1, 3)))
        if r < 0.8:
            return b"".join(mutate(rng, rng.choice(corpus), corpus) for _ in range(rng.randint(1, 4)))
        if r < 0.9:
            return rng.randbytes(rng.randint(0, 64)) + b"\x7e\x7e" * rng.randint(1, 200) + rng.randbytes(rng.randint(0, 64))
        return rng.randbytes(rng.randint(0, 5000))

    return corpus, make


def sl651_centre_target(n: int, seed: int) -> Report:
    from device_drivers import sl651
    from device_drivers.drivers.sl651 import SL651Driver

    cfg = _fuzz_site(SL651_CENTRE_SITE)
    driver = SL651Driver(cfg.buses[0], cfg.devices)
    _, make_bytes = _sl651_inputs("0053010001")
    delivered: list[int] = []

    class Link:
        async def transaction(self, op):  # type: ignore[no-untyped-def]
            return await op()

        async def pause(self, seconds: float) -> None:
            return None

        def now_ms(self) -> int:
            return T0

    link = Link()

    def deliver(name: str, readings: list[Any]) -> None:
        delivered.append(len(readings))

    async def feed(chunks: list[bytes]) -> None:
        deframer = sl651.Deframer()
        for chunk in chunks:
            for frame in deframer.feed(chunk):
                reply = driver._frame(frame, deliver, link)
                if reply is not None:
                    sl651.decode_frame(reply)  # a confirm the station can read
            if len(deframer._buf) > deframer.max_frame + 14:
                raise AssertionError(f"{len(deframer._buf)} bytes held")

    loop = asyncio.new_event_loop()

    def make(rng: random.Random) -> list[bytes]:
        return _chunks(rng, make_bytes(rng))

    try:
        with _quiet():
            return _pure("sl651.centre", n, seed, make, lambda chunks: loop.run_until_complete(feed(chunks)), ())
    finally:
        loop.close()


def sl651_station_target(n: int, seed: int) -> Report:
    """The station uplink's listener reading what a (lying) centre sends: confirms, queries, anything."""
    from device_drivers import sl651
    from gateway.uplink.sl651 import Config, SL651Uplink

    config = Config.from_dict({
        "kind": "sl651", "name": "authority", "centre": "127.0.0.1:5005", "centre_address": 1, "station": "0053010001",
        "password": "1234", "station_class": "K", "elements": [{"element": "ZU", "point": "radar.level"}],
    }, "uplinks[0]")

    class Clock:
        def time_ms(self) -> int:
            return T0

        def monotonic(self) -> float:
            return 0.0

    class Latest:
        def get(self, point: int) -> Any:
            return None

    class Context:
        clock, latest = Clock(), Latest()

        def resolve(self, name: str) -> int:
            return 0

        def subscribe(self) -> Any:
            return asyncio.Queue()

        def rules_on_point(self, point: int) -> tuple[str, ...]:
            return ()

    uplink = SL651Uplink(config, Context())  # type: ignore[arg-type]

    class Writer:
        written = 0

        def write(self, data: bytes) -> None:
            self.written += len(data)
            sl651.decode_frame(data)

        async def drain(self) -> None:
            return None

    _, make_bytes = _sl651_inputs("0053010001")

    def downlink(rng: random.Random) -> bytes:
        data = make_bytes(rng)
        if rng.random() < 0.5:  # the centre's own frames: confirms and queries for this station
            f = sl651.Frame(False, 1, "0053010001", 0x1234, rng.choice((0x32, 0x33, 0x37, 0x2F, 0x3A)),
                            mutate_bytes(rng, sl651.encode_short_body(rng.randint(0, 70000) % 65536, (25, 7, 15, 8, 0, 0))), sl651.EOT)
            data = sl651.encode_frame(f) + data
        return data

    def mutate_bytes(rng: random.Random, b: bytes) -> bytes:
        from fuzz.generate import mutate

        return mutate(rng, b) if rng.random() < 0.5 else b

    async def feed(chunks: list[bytes]) -> None:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        uplink._writer = Writer()  # type: ignore[assignment]
        await uplink._listen(reader)

    loop = asyncio.new_event_loop()
    try:
        with _quiet():
            return _pure("sl651.station", n, seed, lambda rng: _chunks(rng, downlink(rng)),
                         lambda chunks: loop.run_until_complete(feed(chunks)), ())
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------------- transports


def _crc16(data: bytes) -> bytes:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


def _pdu(rng: random.Random, count: int) -> bytes:
    """A reply PDU for "read `count` holding registers": right, an exception, or wrong in one way."""
    r = rng.random()
    if r < 0.4:
        return bytes([3, 2 * count]) + rng.randbytes(2 * count)
    if r < 0.55:
        return bytes([0x83, rng.choice((1, 2, 3, 4, 6, 11, 0, 255))])
    if r < 0.7:
        return bytes([rng.choice((1, 2, 4, 5, 6, 15, 16, 43, 0, 127, 128, 255)), rng.randint(0, 255)]) + rng.randbytes(rng.randint(0, 20))
    if r < 0.85:
        return bytes([3, rng.randint(0, 255)]) + rng.randbytes(rng.randint(0, 260))
    return rng.randbytes(rng.randint(0, 12))


def modbus_tcp_target(n: int, seed: int) -> Report:
    from device_drivers.modbus import DeviceError, ModbusTransport, TcpSettings, TransportError
    from device_drivers.registers import Table
    from fuzz.generate import mutate

    rng = random.Random(seed)
    report, started = Report("modbus.tcp"), time.monotonic()
    sent: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", head)
                request = await reader.readexactly(length - 1)
                count = struct.unpack(">H", request[3:5])[0] if len(request) >= 5 else 1
                pdu = _pdu(rng, count)
                frame = struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu
                honest = rng.random() < 0.5
                if not honest:
                    frame = mutate(rng, frame)
                sent.append(frame)
                writer.write(frame)
                await writer.drain()
                if not honest:  # a lying frame: hang up, so the client does not sit out its timeout
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = ModbusTransport("fuzz", TcpSettings("127.0.0.1", port, 0.005))
        for _ in range(n):
            count = rng.randint(1, 125)
            report.inputs += 1
            t = time.perf_counter_ns()
            before = len(sent)
            try:
                values = await transport.read(Table.HOLDING, 0, count, 1)
                if len(values) != count or not all(isinstance(v, int) and 0 <= v < 65536 for v in values):
                    raise AssertionError(f"{len(values)} values for {count} registers")
            except (DeviceError, TransportError) as exc:
                if "no answer" in str(exc):
                    report.timeouts += 1
                    continue
            except Exception as exc:  # noqa: BLE001
                report.crash(exc, sent[-1] if len(sent) > before else b"")
            report.timed(t, sent[-1] if len(sent) > before else b"")
        transport.close()
        server.close()

    asyncio.run(main())
    return _finish(report, started)


def modbus_rtu_target(n: int, seed: int) -> Report:
    import termios
    import tty

    from device_drivers.modbus import DeviceError, ModbusTransport, SerialSettings, TransportError
    from device_drivers.registers import Table

    rng = random.Random(seed)
    report, started = Report("modbus.rtu"), time.monotonic()
    master, slave = os.openpty()
    tty.setraw(master, termios.TCSANOW)
    tty.setraw(slave, termios.TCSANOW)
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    last: list[bytes] = [b""]

    def on_request() -> None:
        try:
            request = os.read(master, 256)
        except BlockingIOError:
            return
        if len(request) < 8:
            return
        count = struct.unpack(">H", request[4:6])[0]
        body = bytes([request[0]]) + _pdu(rng, count)
        frame = body + _crc16(body)
        r = rng.random()
        if r < 0.25:
            out = frame
        elif r < 0.5:
            out = rng.randbytes(rng.randint(1, 30)) + frame  # noise before the reply
        elif r < 0.7:
            out = frame + rng.randbytes(rng.randint(1, 30))  # noise after it
        elif r < 0.85:
            b = bytearray(frame)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)  # a flipped bit: CRC error
            out = bytes(b)
        elif r < 0.95:
            out = rng.randbytes(rng.randint(1, 60))  # only garbage
        else:
            out = b""  # silence
        last[0] = out
        if out:
            os.write(master, out)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(master, on_request)
        transport = ModbusTransport("fuzz", SerialSettings(path, 115200, 8, "N", 1, 0.005))
        for _ in range(n):
            count = rng.randint(1, 60)
            report.inputs += 1
            t = time.perf_counter_ns()
            try:
                values = await transport.read(Table.HOLDING, 0, count, 1)
                if len(values) != count:
                    raise AssertionError(f"{len(values)} values for {count} registers")
            except (DeviceError, TransportError) as exc:
                if "no answer" in str(exc) or "bad frame" in str(exc):
                    report.timeouts += 1  # what pymodbus could not frame, it waits out: the protocol's timeout
                    await asyncio.sleep(0.005)  # the line's quiet time, as the bus scheduler keeps it
                    _drain(master)
                    continue
            except Exception as exc:  # noqa: BLE001
                report.crash(exc, last[0])
            report.timed(t, last[0])
            _drain(master)
        loop.remove_reader(master)
        transport.close()

    try:
        asyncio.run(main())
    finally:
        os.close(master)
        os.close(slave)
    return _finish(report, started)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def node_mqtt_target(n: int, seed: int) -> Report:
    """The node's MQTT packet parser under real MicroPython (WebAssembly port); the loop runs inside it."""
    import json
    import subprocess

    started = time.monotonic()
    runner = ROOT / "firmware" / "host" / "run.mjs"
    cmd = ["node", str(runner), "--mount", f"{ROOT / 'firmware' / 'yujing_node'}:/lib/yujing_node",
           "--mount", f"{ROOT / 'firmware' / 'host' / 'sim'}:/lib", str(ROOT / "fuzz" / "node_mqtt.py"), str(n), str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "firmware" / "host", timeout=3600)
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    report = Report("node.mqtt")
    try:
        got = json.loads(line)
    except ValueError:
        report.crashes = 1
        report.examples = [f"the MicroPython run ended without a report (exit {proc.returncode}): {proc.stderr[-300:]}"]
        return _finish(report, started)
    report.inputs, report.crashes, report.examples = got["inputs"], got["crashes"], got["examples"]
    report.slowest_ms, report.slowest_input = got["slowest_us"] / 1000, got["slowest_input"]
    report.observed_max_ms = got.get("worst_us", 0) / 1000  # MicroPython's ticks_us under WebAssembly: millisecond-coarse
    report.p999_ms = got.get("p999_us", 0) / 1000
    report.seconds = time.monotonic() - started
    report.peak_rss_mb = got["peak_heap"] / 1048576  # heap one poll() allocated at most (gc.mem_alloc), not the host's RSS
    return report


TARGETS: dict[str, Callable[[int, int], Report]] = {
    "commands": commands_target,
    **{f"wire.{d}": wire_target(d) for d in ("decode_data", "decode_birth", "decode_death", "decode_alarm", "decode_alarms", "decode_reply")},
    "feed": feed_target(False),
    "feed+schema": feed_target(True),
    "config": config_target,
    "modbus.tcp": modbus_tcp_target,
    "modbus.rtu": modbus_rtu_target,
    "node.mqtt": node_mqtt_target,
    "serial_line": serial_line_target,
    "sl651.centre": sl651_centre_target,
    "sl651.station": sl651_station_target,
}

if __name__ == "__main__":  # a child of fuzz/run.py: one target, the report as JSON on stdout
    import dataclasses
    import json

    sys.path.insert(0, str(ROOT))
    name, count, seed_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(dataclasses.asdict(TARGETS[name](count, seed_))))
