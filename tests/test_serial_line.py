"""Plain serial line instruments on real pseudo-terminals: an NMEA anemometer that streams, a laser distance
meter that answers a command, and everything a wire does to them (garbage, partial lines, bad checksums,
a wrong baud rate, an invalid-status sentence, silence). Readings and qualities are checked at the broker."""

from __future__ import annotations

import asyncio
import os
import termios
import tty
from decimal import Decimal
from pathlib import Path

import pytest

from device_drivers.fields import Reader
from device_drivers.lines import Garbage, LineError, LineFormat, LineFramer, nmea_checksum, parse_value
from device_drivers.registry import kinds
from gateway.app import Gateway
from gateway.config import ConfigError

from .e2e import collecting, running, site


def test_nmea_checksum_of_the_textbook_sentence() -> None:
    # The GGA example of every NMEA 0183 reference: "...,M,,*47"
    assert nmea_checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,") == "47"


def test_framer_cuts_lines_across_chunks_and_bounds_garbage() -> None:
    f = LineFramer(b"\r\n", max_line=16)
    assert list(f.feed(b"$A,1*")) == []
    assert list(f.feed(b"00\r\n$B")) == [b"$A,1*00"]
    got = list(f.feed(b"x" * 40))
    assert len(got) == 1 and isinstance(got[0], Garbage) and f.pending == 0  # bounded: an endless line is dropped


def test_line_format_checks_start_and_checksum() -> None:
    fmt = LineFormat(start="$", checksum="nmea", separator=",")
    body = "WIMWV,214.8,R,5.25,M,A"
    line = f"$${body}*{nmea_checksum(body)}".encode()  # noise before the start character is dropped
    assert fmt.fields(line)[1] == "214.8" and fmt.fields(line)[3] == "5.25"
    with pytest.raises(LineError, match="checksum"):
        fmt.fields(f"${body}*00".encode())
    with pytest.raises(LineError, match="not ascii"):
        fmt.fields(b"\xfe\xff\x80")


def test_values_stay_exact_decimals() -> None:
    assert parse_value("12.30", "decimal") == Decimal("12.30")
    assert parse_value("5.25", "decimal", Decimal("3.6")) == Decimal("18.900")
    assert parse_value("A", "bool") is True
    for bad in ("1e99999", "nan", "", "12,3", "0x10"):
        with pytest.raises(LineError):
            parse_value(bad, "decimal")


def test_the_sample_configures_a_bus_and_a_device() -> None:
    import tomllib

    kind = kinds()["serial_line"]
    doc = tomllib.loads(kind.sample)
    errors: list = []
    bus_r = Reader(doc["buses"][0], "buses[0]", errors)
    settings = kind.parse_bus(bus_r, "serial_line")
    assert settings is not None
    from gateway.config import BusConfig

    bus = BusConfig("anemometer", "serial_line", settings)
    dev_r = Reader({k: v for k, v in doc["devices"][0].items() if k not in ("name", "bus", "interval_s")}, "devices[0]", errors)
    parsed = kind.parse_device(dev_r, bus)
    dev_r.finish()
    assert errors == [] and parsed is not None
    spec, points = parsed
    assert spec.mode == "stream" and [p.name for p in points] == ["direction", "speed"]


class Pty:
    """A pseudo-terminal pair: the gateway opens `path`, the test is the instrument on `master`."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master, termios.TCSANOW)
        tty.setraw(self.slave, termios.TCSANOW)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read(self) -> bytes:
        try:
            return os.read(self.master, 4096)
        except (BlockingIOError, OSError):
            return b""

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def mwv(direction: str, speed: str, status: str = "A") -> bytes:
    body = f"WIMWV,{direction},R,{speed},M,{status}"
    return f"${body}*{nmea_checksum(body)}\r\n".encode()


WIND = """
[[buses]]
name = "anemometer"
type = "serial_line"
port = "{port}"
baudrate = 4800

[[devices]]
name = "wind"
bus = "anemometer"
interval_s = 0.25
mode = "stream"
start = "$"
checksum = "nmea"
separator = ","
valid = {{ field = 5, equals = "A" }}
  [[devices.points]]
  name = "direction"
  field = 1
  unit = "deg"
  max = 360
  [[devices.points]]
  name = "speed"
  field = 3
  unit = "m/s"
"""


async def test_a_streaming_anemometer_through_everything_a_wire_does(mosquitto, tmp_path: Path) -> None:
    pty = Pty()
    cfg = site(mosquitto.port, tmp_path, WIND.format(port=pty.path))
    phases: list[tuple[str, int]] = []

    async def phase(name: str, seconds: float, line: bytes | None, every: float = 0.05) -> None:
        gw_readings = gw.readings
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            if line is not None:
                pty.write(line)
            await asyncio.sleep(every)
        phases.append((name, gw.readings - gw_readings))

    try:
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await asyncio.sleep(0.3)
            await phase("good", 1.0, mwv("214.8", "5.25"))
            await phase("split", 0.6, None)
            split = mwv("100.5", "1.00")
            for _ in range(6):  # a line arriving in pieces
                pty.write(split[:9])
                await asyncio.sleep(0.02)
                pty.write(split[9:])
                await asyncio.sleep(0.08)
            await phase("bad checksum", 1.0, b"$WIMWV,214.8,R,5.25,M,A*00\r\n")
            await phase("wrong baud", 1.0, bytes(range(0x80, 0xFF)) * 3)
            await phase("invalid status", 1.0, mwv("214.8", "5.25", status="V"))
            await phase("silence", 1.0, None)
            await phase("good again", 1.0, mwv("90.0", "12.50"))
            await col.wait_for(lambda c: any(r["value"] == 12.5 for r in c.records if r.get("point") == "speed"), timeout=10)
    finally:
        pty.close()
    speeds = [r for r in col.records if r.get("point") == "speed"]
    qualities = {r["quality"] for r in speeds}
    assert {"good", "framing", "device_fault", "timeout"} <= qualities, qualities
    good = [r["value"] for r in speeds if r["quality"] == "good"]
    assert 5.25 in good and 12.5 in good
    directions = {r["value"] for r in col.records if r.get("point") == "direction" and r["quality"] == "good"}
    assert {214.8, 100.5, 90} <= directions
    assert all(n > 0 for _, n in phases), phases  # readings at every interval, whatever the wire did


METER = """
[[buses]]
name = "laser"
type = "serial_line"
port = "{port}"
timeout_s = 0.3

[[devices]]
name = "ldm"
bus = "laser"
interval_s = 0.2
mode = "poll"
command = "D\\r\\n"
pattern = 'D (?P<distance>[-0-9.]+) m'
  [[devices.points]]
  name = "distance"
  group = "distance"
  unit = "m"
"""


async def test_a_polled_distance_meter_answers_times_out_and_recovers(mosquitto, tmp_path: Path) -> None:
    pty = Pty()
    cfg = site(mosquitto.port, tmp_path, METER.format(port=pty.path))
    mode = {"answer": "D 12.345 m\r\n"}
    commands = []

    async def instrument() -> None:
        buf = b""
        while True:
            buf += pty.read()
            while b"\r\n" in buf:
                cmd, _, buf = buf.partition(b"\r\n")
                commands.append(cmd)
                if mode["answer"]:
                    pty.write(mode["answer"].encode())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(instrument())
    try:
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)):
            await col.wait_for(lambda c: any(r.get("value") == 12.345 for r in c.records))
            mode["answer"] = ""
            await col.wait_for(lambda c: c.records[-1]["quality"] in ("timeout", "offline"), timeout=10)
            mode["answer"] = "D 1.500 m\r\n"
            await col.wait_for(lambda c: c.records[-1].get("value") == 1.5, timeout=20)
    finally:
        task.cancel()
        pty.close()
    assert commands and set(commands) == {b"D"}


def test_configuration_mistakes_are_named() -> None:
    from gateway.config import parse

    text = f"""
[site]
id = "S"
gateway = "g"
[uplink]
host = "127.0.0.1"
tls = false
[[buses]]
name = "laser"
type = "serial_line"
port = "/dev/null"
[[devices]]
name = "ldm"
bus = "laser"
interval_s = 1
mode = "poll"
pattern = 'no groups here'
  [[devices.points]]
  name = "distance"
  group = "distance"
"""
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    lines = "\n".join(info.value.lines())
    assert "devices[0].command: poll mode sends a command" in lines
    assert "devices[0].pattern: needs named groups" in lines


def test_framing_fields_and_ranges_that_could_never_work_are_refused() -> None:
    """Each of these passed the check once and failed only at the site (or, for non-Latin text, crashed it)."""
    from gateway.config import parse

    text = """
[site]
id = "S"
gateway = "g"
[uplink]
host = "127.0.0.1"
tls = false
[[buses]]
name = "laser"
type = "serial_line"
port = "/dev/ttyX0"
[[devices]]
name = "ldm"
bus = "laser"
interval_s = 1
mode = "poll"
command = "测\\r\\n"
start = "¥"
pattern = '(?P<dist>[0-9.]+) m'
valid = { field = 3, equals = "A" }
  [[devices.points]]
  name = "distance"
  group = "dist"
  field = 1
  min = 10
  max = 1
[[devices]]
name = "ldm2"
bus = "laser"
interval_s = 1
mode = "poll"
command = "D\\r\\n"
terminator = "\\r"
separator = ","
  [[devices.points]]
  name = "distance"
  field = 0
  group = "dist"
"""
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    lines = "\n".join(info.value.lines())
    assert "devices[0].command: invalid value '测\\r\\n': ASCII text to send" in lines
    assert "devices[0].start: invalid value '¥'" in lines
    assert "devices[0].valid.field: with a pattern, the status field is one of its groups (dist)" in lines
    assert "devices[0].points[0].field: with a pattern, a point takes a group" in lines
    assert "devices[0].points[0].min: min 10 is above max 1" in lines
    assert "devices[1].points[0].group: a group is for a pattern" in lines


def test_devices_on_one_bus_share_its_line_framing() -> None:
    from gateway.config import parse

    text = """
[site]
id = "S"
gateway = "g"
[uplink]
host = "127.0.0.1"
tls = false
[[buses]]
name = "line"
type = "serial_line"
port = "/dev/ttyX0"
[[devices]]
name = "a"
bus = "line"
interval_s = 1
mode = "poll"
command = "A\\r\\n"
  [[devices.points]]
  name = "v"
  field = 0
[[devices]]
name = "b"
bus = "line"
interval_s = 1
mode = "poll"
command = "B\\r\\n"
terminator = "\\r"
  [[devices.points]]
  name = "v"
  field = 0
"""
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    assert "devices[1].terminator: devices on bus 'line' share one line framing" in "\n".join(info.value.lines())
