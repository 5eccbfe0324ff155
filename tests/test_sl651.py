"""SL 651-2014: the codec against the standard's frames, and the gateway as a centre for a simulated station
over real TCP (confirms, duplicates, multi-packet messages out of order, noise, refusals)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from device_drivers import sl651
from gateway.app import Gateway
from tests.conftest import free_port

from .e2e import collecting, running, site

# docs/sl651.md §1.12: TIMED and ADDED were built for this project by the standard's tables and decoded by an
# independent parser (64673a/SL651-2014), CRCs passing; RIVER is that repository's samples/regular_report.hex.
TIMED = bytes.fromhex("7E7E010053010001123432002B020001250715080000F1F100530100014BF0F02507150800201900012526190035603B23019523843812126803FA37")
ADDED = bytes.fromhex("7E7E0100530100011234330027020002250715081512F1F100530100014BF0F025071508153B230195412045200000000438121261036054")
RIVER = bytes.fromhex("7E7E010010100001A00032002B02000C200724172349F1F1001010000148F0F020072417232019000130221900004039230000055038121268038397")
CST = timezone(timedelta(hours=8))


def test_the_standard_frames_decode_to_their_values_and_encode_back_byte_for_byte() -> None:
    expected = {
        TIMED: (0x32, 1, {0x20: Decimal("12.5"), 0x26: Decimal("356.0"), 0x3B: Decimal("1952.384"), 0x38: Decimal("12.68")}),
        ADDED: (0x33, 2, {0x3B: Decimal("1954.120"), 0x45: 4, 0x38: Decimal("12.61")}),
        RIVER: (0x32, 12, {0x20: Decimal("13.0"), 0x22: Decimal("4.0"), 0x39: Decimal("0.550"), 0x38: Decimal("12.68")}),
    }
    for raw, (function, serial, values) in expected.items():
        frame = sl651.decode_frame(raw)
        report = sl651.decode_report(frame.body)
        assert (frame.function, report.serial) == (function, serial)
        assert {i: v for i, _, v in report.values} == values
        assert sl651.encode_frame(frame) == raw
        assert sl651.encode_report(report) == frame.body
    added = sl651.decode_report(sl651.decode_frame(ADDED).body)
    assert added.values[0][0] == 0x3B  # the trigger element comes first in an added report
    assert (added.station, added.station_class, added.observed) == ("0053010001", 0x4B, (2025, 7, 15, 8, 15, 0))


def test_crc_is_the_modbus_polynomial_high_byte_first() -> None:
    assert sl651.crc16(TIMED[:-2]) == 0xFA37
    broken = TIMED[:-1] + bytes([TIMED[-1] ^ 1])
    with pytest.raises(sl651.SL651Error, match="CRC"):
        sl651.decode_frame(broken)


def test_element_values_negative_missing_and_unknown() -> None:
    assert sl651.encode_element(0x02, Decimal("-5.5")) == bytes([0x02, 0x11, 0xFF, 0x55])
    assert sl651.decode_element_value(0x02, 0x11, bytes([0xFF, 0x55])) == Decimal("-5.5")
    assert sl651.decode_element_value(0x3B, 0x23, b"\xff\xff\xff\xff") is None
    with pytest.raises(sl651.SL651Error, match="not BCD"):
        sl651.decode_element_value(0x3B, 0x23, bytes.fromhex("0195A384"))
    with pytest.raises(sl651.SL651Error, match="does not fit"):
        sl651.encode_element(0x38, Decimal("123.45"))
    # an element the table does not know is skipped by its definition byte, not misread
    body = sl651.decode_frame(TIMED).body
    odd = body[:23] + bytes([0xA7, 0x10, 0x12, 0x34]) + body[23:]
    assert [i for i, _, _ in sl651.decode_report(odd).values] == [0xA7, 0x20, 0x26, 0x3B, 0x38]


def test_the_deframer_skips_noise_and_false_starts_and_reassembles_split_reads() -> None:
    d = sl651.Deframer()
    stream = b"\x00\x7e\xff" + TIMED[:20] + TIMED[20:] + b"\x7e\x7e\x01junk" + ADDED
    frames = []
    for i in range(0, len(stream), 7):
        frames += list(d.feed(stream[i : i + 7]))
    assert [f.function for f in frames] == [0x32, 0x33]
    assert d.skipped >= 3


def test_multi_packet_messages_in_any_order_and_repeated() -> None:
    frame = sl651.decode_frame(TIMED)
    packets = sl651.split_packets(frame, 10)
    assert len(packets) == 5 and [p.end for p in packets] == [sl651.ETB] * 4 + [sl651.ETX]
    decoded = [sl651.decode_frame(sl651.encode_frame(p)) for p in packets]
    r = sl651.Reassembler()
    order = [3, 0, 0, 4, 2, 1]
    results = [r.add(decoded[i]) for i in order]
    assert results[:-1] == [None] * 5 and results[-1] == frame.body


def test_an_m3_packet_built_by_table_22_counts_its_packet_bytes_in_the_length() -> None:
    """Built here byte by byte from Table 22, not with encode_frame: the length is every byte after SYN
    before the end character, so the 3 bytes of packet total (high 12 bits) and sequence (low 12) too."""
    body = bytes.fromhex("0001250715080000F1F1")
    head = bytes.fromhex("7E7E01005301000112343200") + bytes([3 + len(body)]) + b"\x16" + ((2 << 12) | 1).to_bytes(3, "big")
    raw = head + body + b"\x17"
    raw += sl651.crc16(raw).to_bytes(2, "big")
    frame = sl651.decode_frame(raw)
    assert (frame.packet, frame.body, frame.end) == ((2, 1), body, sl651.ETB)
    assert sl651.encode_frame(frame) == raw
    assert [f.packet for f in sl651.Deframer().feed(b"\x00" + raw + raw)] == [(2, 1), (2, 1)]


def test_the_reassembler_holds_a_bounded_number_of_bytes() -> None:
    r = sl651.Reassembler(max_bytes=10_000, max_total=100)
    frame = sl651.Frame(True, 1, "0053010001", 0x1234, 0x32, b"\x00" * 4000, sl651.ETB)
    with pytest.raises(sl651.SL651Error, match="at most 100"):
        r.add(sl651.Frame(**{**frame.__dict__, "packet": (4095, 1)}))
    for station in ("0053010001", "0053010002", "0053010003", "0053010004"):  # four messages in progress
        for seq in (1, 2):
            assert r.add(sl651.Frame(**{**frame.__dict__, "station": station, "packet": (3, seq)})) is None
        assert r._held <= 10_000
    with pytest.raises(sl651.SL651Error, match="more than 10000 bytes"):
        for seq in (1, 2, 3):  # one message of 12 000 bytes in 3 packets that never completes under the cap
            r.add(sl651.Frame(**{**frame.__dict__, "station": "0053010009", "packet": (4, seq)}))
    assert r._held <= 10_000


def test_the_deframer_pays_for_its_crc_work_with_the_bytes_it_gets(monkeypatch) -> None:
    """A stream made of frame starts whose announced lengths all end inside the buffer makes every start a
    candidate to check: without a budget, each 4 kB costs megabytes of CRC on the event loop."""
    spent = [0]
    real = sl651.crc16

    def counting(data: bytes) -> int:
        spent[0] += len(data)
        return real(data)

    monkeypatch.setattr(sl651, "crc16", counting)
    fake = bytes.fromhex("7E7E010053010001123432") + (2000).to_bytes(2, "big") + b"\x02"
    hostile = b"".join(fake[:14] for _ in range(280))  # 3 920 bytes, a start every 14 bytes, each "complete" soon
    d = sl651.Deframer()
    frames = []
    fed = 0
    held = 0
    for _ in range(20):
        for i in range(0, len(hostile), 7):
            frames += list(d.feed(hostile[i : i + 7]))
            fed += 7
            held = max(held, len(d._buf))
    frames += list(d.feed(TIMED))  # an honest frame after all that
    fed += len(TIMED)
    limit = sl651.Deframer.WORK_PER_BYTE * (fed + d.max_frame)
    assert spent[0] <= limit, f"{spent[0]} CRC bytes for {fed} bytes in"
    assert held <= d.max_frame + 7, f"{held} bytes held"
    monkeypatch.setattr(sl651, "crc16", real)
    while not frames:  # the honest frame is found, at the latest after the buffer overflows past the noise
        frames += list(d.feed(b"\x00" * 512))
    assert frames[-1].function == 0x32


SITE = """
[[buses]]
name = "hydro"
type = "sl651"
listen = "127.0.0.1:{port}"
centre = 1

[[devices]]
name = "dam"
bus = "hydro"
station = "0053010001"
password = "1234"
interval_s = 3600
  [[devices.points]]
  name = "ZU"
  element = "ZU"
  [[devices.points]]
  name = "rain_today"
  element = "20"
  [[devices.points]]
  name = "level_alarm"
  element = "ZT"
  bit = 2
"""


class Station:
    """A simulated telemetry station: a TCP client that sends frames and reads the centre's confirms."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.confirms: list[sl651.Frame] = []

    async def __aenter__(self) -> Station:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.deframer = sl651.Deframer()
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while data := await self.reader.read(4096):
            self.confirms += list(self.deframer.feed(data))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        self.writer.close()


async def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_the_gateway_as_centre_takes_confirms_dedups_and_reassembles(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    cfg = site(mosquitto.port, tmp_path, SITE.format(port=port))
    async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
        await _until(lambda: gw.schedulers and gw.schedulers[0].driver._server is not None)
        driver = gw.schedulers[0].driver
        async with Station(port) as st:
            await st.send(b"\x00\x13garbage" + TIMED)
            await _until(lambda: len(st.confirms) == 1)
            await st.send(TIMED)  # the station missed the confirm and sends it again
            await _until(lambda: len(st.confirms) == 2)
            packets = sl651.split_packets(sl651.decode_frame(ADDED), 12)
            for i in (2, 0, 3, 0, 1):  # out of order, one twice
                await st.send(sl651.encode_frame(packets[i]))
            await _until(lambda: len(st.confirms) == 3)
            wrong = sl651.encode_frame(sl651.Frame(True, 1, "0053010001", 0x9999, 0x32, sl651.decode_frame(TIMED).body, sl651.ETX))
            await st.send(wrong + TIMED[:-1] + b"\x00")  # a wrong password, then a bad CRC
            await asyncio.sleep(0.3)
        await col.wait_for(lambda c: sum(1 for r in c.records if r.get("point") == "ZU") >= 2)
        assert driver.duplicates == 1 and driver.refused >= 2
    confirm = st.confirms[0]
    assert (confirm.up, confirm.function, confirm.station, confirm.centre, confirm.end) == (False, 0x32, "0053010001", 1, sl651.EOT)
    assert sl651.decode_short_body(confirm.body)[0] == 1  # it confirms serial 1
    total = len(sl651.split_packets(sl651.decode_frame(ADDED), 12))
    m3 = st.confirms[2]  # Table 23: one SYN confirm for the whole message, sequence = total
    assert (m3.function, m3.packet, m3.end, sl651.decode_short_body(m3.body)[0]) == (0x33, (total, total), sl651.EOT, 2)
    zu = [(r["value"], r["ts"]) for r in col.records if r.get("point") == "ZU"]
    t1 = int(datetime(2025, 7, 15, 8, 0, tzinfo=CST).timestamp() * 1000)
    t2 = int(datetime(2025, 7, 15, 8, 15, tzinfo=CST).timestamp() * 1000)
    assert zu == [(1952.384, t1), (1954.12, t2)]  # once each, stamped with the station's observation time
    assert [r["value"] for r in col.records if r.get("point") == "rain_today"] == [12.5]
    assert [r["value"] for r in col.records if r.get("point") == "level_alarm"] == [True]


STATION_SITE = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {modbus}

[[devices]]
name = "radar"
bus = "plc"
interval_s = 0.2
  [[devices.points]]
  name = "level"
  address = 0
  scale = 0.001
  offset = 1900
  unit = "m"
  [[devices.points]]
  name = "rain_today"
  address = 1
  scale = 0.1
  unit = "mm"

[[rules]]
kind = "threshold"
id = "res.zu"
point = "radar.level"
levels = [ {{ level = "III_YELLOW", set = 1954.0 }} ]

[[uplinks]]
kind = "sl651"
name = "authority"
centre = "127.0.0.1:{centre}"
centre_address = 7
station = "0053010001"
password = "1234"
station_class = "K"
timed_interval_s = 1
keepalive_s = 0.5
confirm_timeout_s = 0.3
fault_after_s = 0.5
add_level = "III_YELLOW"
elements = [ {{ element = "ZU", point = "radar.level" }}, {{ element = "PJ", point = "radar.rain_today" }} ]
"""


class Centre:
    """A simulated SL 651 centre: takes frames, confirms reports (unless told not to), can query."""

    def __init__(self) -> None:
        self.frames: list[sl651.Frame] = []
        self.confirm = True
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", port)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        d = sl651.Deframer()
        while data := await reader.read(4096):
            for f in d.feed(data):
                self.frames.append(f)
                if self.confirm and f.function in (sl651.F_TIMED, sl651.F_ADDED):
                    serial, _ = sl651.decode_short_body(f.body)
                    writer.write(sl651.encode_frame(sl651.Frame(False, f.centre, f.station, f.password, f.function,
                                                                sl651.encode_short_body(serial, (2026, 1, 1, 0, 0, 0)), sl651.EOT)))

    async def query(self) -> None:
        assert self.writer is not None
        self.writer.write(sl651.encode_frame(sl651.Frame(False, 7, "0053010001", 0x1234, sl651.F_QUERY,
                                                         sl651.encode_short_body(0, (2026, 1, 1, 0, 0, 0)), sl651.ENQ)))

    def reports(self, function: int) -> list[sl651.Report]:
        return [sl651.decode_report(f.body) for f in self.frames if f.function == function]


async def test_the_gateway_reports_as_a_station_timed_added_queried_and_resent(mosquitto, tmp_path: Path) -> None:
    from gateway.sim.devices import SimServer, SimSlave

    modbus = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
    await server.start()
    centre = Centre()
    cfg = site(mosquitto.port, tmp_path, STATION_SITE.format(modbus=modbus, centre=await centre.start()))
    level, rain = cfg.devices[0].points
    try:
        await server.set_point(1, level, Decimal("1953.215"))
        await server.set_point(1, rain, Decimal("12.5"))
        async with running(Gateway(cfg)) as gw:
            await _until(lambda: len(centre.reports(sl651.F_TIMED)) >= 1, timeout=5)
            timed = centre.reports(sl651.F_TIMED)[0]
            await server.set_point(1, level, Decimal("1954.120"))
            await _until(lambda: len(centre.reports(sl651.F_ADDED)) >= 1, timeout=5)
            added = centre.reports(sl651.F_ADDED)[0]
            await centre.query()
            await _until(lambda: len(centre.reports(sl651.F_QUERY)) >= 1)
            answer = centre.reports(sl651.F_QUERY)[0]
            centre.confirm = False
            before = len(centre.frames)
            await _until(lambda: sum(1 for f in centre.frames[before:] if f.function == sl651.F_TIMED) >= 3, timeout=5)
            unconfirmed = [sl651.decode_short_body(f.body)[0] for f in centre.frames[before:] if f.function == sl651.F_TIMED][:3]
            uplink = gw.extra_uplinks[0]
            await _until(lambda: uplink.sent["given_up"] >= 1, timeout=5)
            assert "does not confirm" in gw.health.faults["uplink.sl651.authority"]
    finally:
        await server.stop()
        centre.server.close()
    assert {i: v for i, _, v in timed.values} == {0x3B: Decimal("1953.215"), 0x20: Decimal("12.5")}
    assert (timed.station, timed.station_class) == ("0053010001", 0x4B)
    assert [i for i, _, _ in added.values][0] == 0x3B and added.values[0][2] == Decimal("1954.120")  # the trigger first
    assert {i: v for i, _, v in answer.values}[0x3B] == Decimal("1954.120")
    assert len(set(unconfirmed)) == 1  # one report, sent three times: the first and two resends
    assert uplink.sent["given_up"] >= 1
    assert any(f.function == sl651.F_KEEPALIVE for f in centre.frames)
    assert all(f.up and f.centre == 7 and f.password == 0x1234 for f in centre.frames)


async def test_reports_made_while_the_centre_is_unreachable_are_sent_in_order_when_it_is_back(mosquitto, tmp_path: Path) -> None:
    """docs/domain.md §7.1 scenario 1: the level crosses its line while the water authority's centre is
    unreachable; the timed and added reports are made on time, with the values and observation times of
    then, and reach the centre oldest first once it listens."""
    from gateway.sim.devices import SimServer, SimSlave

    modbus = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", modbus))
    await server.start()
    centre_port = free_port()  # nothing listens there yet
    cfg = site(mosquitto.port, tmp_path, STATION_SITE.format(modbus=modbus, centre=centre_port))
    level, rain = cfg.devices[0].points
    centre = Centre()
    try:
        await server.set_point(1, level, Decimal("1953.215"))
        await server.set_point(1, rain, Decimal("12.5"))
        async with running(Gateway(cfg)) as gw:
            await _until(lambda: bool(gw.extra_uplinks))
            uplink = gw.extra_uplinks[0]
            await _until(lambda: uplink.sent["timed"] >= 2, timeout=5)
            await server.set_point(1, level, Decimal("1954.120"))  # yellow: an added report, link still down
            await _until(lambda: uplink.sent["added"] >= 1, timeout=5)
            made = list(uplink.outbox)
            assert len(made) >= 3 and uplink.sent["confirmed"] == 0
            await _until(lambda: "uplink.sl651.authority" in gw.health.faults, timeout=5)  # unreachable past fault_after_s
            assert "reports waiting" in gw.health.faults["uplink.sl651.authority"]
            await centre.start(centre_port)
            await _until(lambda: len(centre.frames) >= len(made) and not any(s == made[-1][1] for _, s, _ in uplink.outbox), timeout=10)
            assert "uplink.sl651.authority" not in gw.health.faults  # cleared by the first confirm
    finally:
        await server.stop()
        if centre.server is not None:
            centre.server.close()
    got = [(f.function, sl651.decode_short_body(f.body)[0]) for f in centre.frames if f.function != sl651.F_KEEPALIVE]
    assert got[: len(made)] == [(function, serial) for function, serial, _ in made]  # oldest first, as made
    added = next(sl651.decode_report(f.body) for f in centre.frames if f.function == sl651.F_ADDED)
    assert added.values[0][0] == 0x3B and added.values[0][2] == Decimal("1954.120")
    first = sl651.decode_report(centre.frames[0].body)
    assert {i: v for i, _, v in first.values}[0x3B] == Decimal("1953.215")  # the value of then, not of now


SERIAL_SITE = """
[[buses]]
name = "radio"
type = "sl651"
port = "{tty}"
baudrate = 9600
centre = 1

[[devices]]
name = "dam"
bus = "radio"
station = "0053010001"
interval_s = 3600
  [[devices.points]]
  name = "ZU"
  element = "ZU"
"""


async def test_the_centre_on_a_serial_line_confirms_and_a_hung_up_port_costs_no_cpu(mosquitto, tmp_path: Path, caplog) -> None:
    """A station behind a radio modem on a serial port (a real pty): its report is confirmed on the same line;
    when the line hangs up, the driver reopens with backoff instead of spinning on a dead descriptor."""
    import os
    import termios
    import time
    import tty

    master, slave = os.openpty()
    tty.setraw(master, termios.TCSANOW)
    tty.setraw(slave, termios.TCSANOW)
    os.set_blocking(master, False)
    cfg = site(mosquitto.port, tmp_path, SERIAL_SITE.format(tty=os.ttyname(slave)))
    received = b""
    async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
        await asyncio.sleep(0.5)
        os.write(master, b"\xff\x00" + TIMED)  # line noise, then the report
        deframer = sl651.Deframer()
        confirms: list[sl651.Frame] = []

        def read() -> bool:
            nonlocal received
            try:
                chunk = os.read(master, 4096)
            except BlockingIOError:
                return False
            received += chunk
            confirms.extend(deframer.feed(chunk))
            return bool(confirms)

        await _until(read)
        await col.wait_for(lambda c: any(r.get("point") == "ZU" for r in c.records))
        os.close(master)  # the line hangs up
        cpu = time.process_time()
        await asyncio.sleep(2.0)
        spent = time.process_time() - cpu
        assert gw.schedulers  # still running
    os.close(slave)
    assert confirms[0].function == 0x32 and not confirms[0].up
    assert [r["value"] for r in col.records if r.get("point") == "ZU"] == [1952.384]
    # a busy loop on the dead descriptor would burn ~2 s of CPU here (the bound is loose on purpose: not a benchmark)
    assert spent < 0.8, f"{spent:.2f} s of CPU in 2 s after the hang-up"
