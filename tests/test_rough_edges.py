"""What a new user hits first (issue 10): a check that stops at the first kind of mistake, a state directory
that only the start finds unwritable, a broker whose refusal is never said, a serial port that does not
open without saying why, alarm lines that say things twice, float32 noise from `yujing consume`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from device_drivers.base import TransportError, serial_open_failure
from device_drivers.modbus import ModbusTransport, SerialSettings
from device_drivers.registers import Table
from gateway import wire
from gateway.alarms import AlarmDesk
from gateway.clock import SystemClock
from gateway.config import ConfigError, load, parse
from gateway.consumer import Decoder
from gateway.demo import _print_reading, yujing_command
from gateway.model import PointInfo, Reading
from gateway.rules import Level
from gateway.storage import Storage
from gateway.uplink.mqtt import Identity, Uplink
from tests.conftest import free_port

from .test_rules_support import MIN, T0, Site

ROOT = Path(__file__).resolve().parent.parent

SITE = """\
[site]
id = "KM-RES-01"
gateway = "gw1"

[uplink]
host = "127.0.0.1"
tls = false

[spool]
path = "{spool}"

[[buses]]
name = "rs485-a"
type = "rtu"
port = "/dev/ttyS1"

[[devices]]
name = "radar"
bus = "rs485-a"
unit = 1
interval_s = 30
  [[devices.points]]
  name = "gap"
  address = 1
"""

# Six independent mistakes, of four kinds: every one must be reported in one run.
MISTAKES = """
[[devices]]
name = "piezo"
bus = "rs485-a"
unit = 1
interval_s = 60
  [[devices.points]]
  name = "p1"
  address = 0
  sacle = 0.1

[[rules]]
kind = "threshold"
id = "res.gap.a"
point = "radar.gapp"
levels = [ { level = "IV_BLUE", set = 100 } ]

[[rules]]
kind = "threshold"
id = "res.gap.b"
point = "radar.nope"
levels = [ { level = "IV_BLUE", set = 100 } ]

[[rules]]
kind = "threshold"
id = "res.p1"
descriptoin = "piezometer 1"
point = "piezo.p2"
levels = [ { level = "IV_BLUE", set = 100 } ]
"""


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_check_reports_every_independent_mistake_in_one_run(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(spool=tmp_path / "state" / "spool") + MISTAKES)
    done = _cli("check", str(site))
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    expected = [
        ("devices[1].unit:", "unit 1 on bus 'rs485-a' is already used by 'radar'"),
        ("devices[1].points[0].sacle:", "unknown key (did you mean 'scale'?)"),
        ("rules[0].point:", "unknown point 'radar.gapp'"),
        ("rules[1].point:", "unknown point 'radar.nope'"),
        ("rules[2].descriptoin:", "did you mean 'description'?"),
        ("rules[2].point:", "unknown point 'piezo.p2'"),
    ]
    for where, what in expected:
        assert any(f": {where} " in line and what in line for line in lines), (where, what, lines)
    assert lines[-1] == f"{site}: 6 problem(s); nothing was started", lines
    # each with its line in the file, top to bottom
    numbers = [int(line.split(":")[1]) for line in lines[:-1]]
    assert numbers == sorted(numbers) and all(n > 0 for n in numbers), lines


def test_an_action_with_a_typo_still_has_its_unknown_bus_reported(tmp_path: Path) -> None:
    text = SITE.format(spool=tmp_path / "spool") + """
[[rules]]
kind = "threshold"
id = "res.gap"
point = "radar.gap"
levels = [ { level = "IV_BLUE", set = 100 } ]

[[actions]]
kind = "coil"
name = "siren"
when = { rules = ["res.gap"], level = "IV_BLUE" }
bus = "rs485-b"
unit = 10
address = 0
invertt = true
"""
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml", base=tmp_path)
    lines = info.value.lines()
    assert any("actions[0].invertt: unknown key; did you mean 'invert'?" in line for line in lines), lines
    assert any("actions[0].bus:" in line and "rs485-b" in line for line in lines), lines


def test_check_and_run_refuse_a_state_directory_that_cannot_be_created(tmp_path: Path) -> None:
    # A regular file where the state directory's parent should be: nobody, root included, can create it.
    (tmp_path / "blocker").write_text("not a directory\n")
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(spool="blocker/state/spool"))
    state = tmp_path / "blocker" / "state"

    load(site)  # the file itself is valid: it may be checked elsewhere or as another user
    with pytest.raises(ConfigError) as info:
        load(site, writable_state=True)
    assert info.value.lines() == [
        f"{site}:10: spool.path: state directory {state} cannot be created: {tmp_path / 'blocker'} is a file, not a directory"
    ]

    check = _cli("check", str(site))
    assert check.returncode == 1 and f"spool.path: state directory {state} cannot be created" in check.stderr, check
    run = _cli("run", str(site))
    assert run.returncode == 2, run
    assert run.stderr.splitlines() == info.value.lines(), run.stderr  # one line, no traceback


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="switches to user nobody with setpriv")
def test_check_names_a_state_directory_this_user_may_not_write() -> None:
    """As non-root (nobody) under a root-owned directory: what `yujing run examples/reservoir.toml` hit."""
    with tempfile.TemporaryDirectory() as name:  # in /tmp, which nobody can enter, unlike pytest's tmp_path
        top = Path(name)
        top.chmod(0o755)
        (top / "lib").mkdir(mode=0o755)
        site = top / "site.toml"
        site.write_text(SITE.format(spool=top / "lib" / "yujing" / "spool"))
        site.chmod(0o644)
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                               "gateway.cli", "check", str(site)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"{site}:10: spool.path: state directory {top / 'lib' / 'yujing'} cannot be created: "
                                  f"{top / 'lib'} is not writable by user nobody; run it as the gateway's user"), done.stderr


async def test_the_uplink_says_once_why_it_cannot_connect(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens: every attempt and every probe is refused
    cfg = parse(SITE.format(spool=tmp_path / "spool").replace('tls = false', f"tls = false\nport = {port}"), "site.toml",
                base=tmp_path)

    class Counting(Uplink):
        attempts = 0

        async def _reachable(self) -> bool:
            self.attempts += 1
            return await super()._reachable()

    uplink = Counting(cfg.uplink, Identity("KM-RES-01", "gw1", "test"), Storage(tmp_path / "spool"), 1, SystemClock())
    caplog.set_level(logging.INFO, logger="yujing.uplink")
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))
    for _ in range(200):
        if uplink.attempts >= 4:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert uplink.attempts >= 4
    said = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert said[0].levelno == logging.WARNING
    assert said[0].getMessage().startswith(f"broker 127.0.0.1:{port}: cannot connect: Connection refused (")
    probing = [r for r in caplog.records if "probing" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(probing) <= 1


async def test_a_serial_port_that_does_not_open_says_why_once(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyUSB9")
    transport = ModbusTransport("rs485-a", SerialSettings(port=missing))
    with pytest.raises(TransportError) as info:
        await transport.read(Table.HOLDING, 0, 1, 1)
    text = str(info.value)
    assert text.startswith(f"rs485-a: cannot open {missing}: No such file or directory (is the adapter plugged in"), text
    assert text.count("rs485-a") == 1 and "/dev/serial/by-id" in text
    transport.close()

    # what pyserial raises carries the errno: the same words
    import serial

    with pytest.raises(serial.SerialException) as raised:
        serial.Serial(missing)
    assert serial_open_failure(missing, raised.value) == text.removeprefix("rs485-a: ")
    # a path through a regular file: the OS reason, no hint to guess
    (tmp_path / "file").write_text("")
    assert serial_open_failure(str(tmp_path / "file" / "tty")) == f"cannot open {tmp_path / 'file' / 'tty'}: Not a directory"


class _Link:
    """What a bus scheduler gives a driver, without the schedule: pauses are short here."""

    async def transaction(self, call):  # type: ignore[no-untyped-def]
        return await call()

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(0.01)

    def now_ms(self) -> int:
        return T0


async def test_a_streaming_instrument_whose_port_does_not_open_is_not_a_bad_line(tmp_path: Path,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from gateway.poll.bus import make_driver

    missing = tmp_path / "ttyUSB9"
    cfg = parse(SITE.format(spool=tmp_path / "spool").split("[[buses]]")[0] + f"""
[[buses]]
name = "anemometer"
type = "serial_line"
port = "{missing}"
baudrate = 4800

[[devices]]
name = "wind"
bus = "anemometer"
interval_s = 1
mode = "stream"
separator = ","
  [[devices.points]]
  name = "speed"
  field = 3
""", "site.toml", base=tmp_path)
    driver = make_driver(cfg.buses[0], list(cfg.devices))
    delivered: list[object] = []
    caplog.set_level(logging.WARNING, logger="yujing.serial_line")
    task = asyncio.create_task(driver.run(lambda device, readings: delivered.append(readings), _Link()))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and lines[0] == (f"anemometer: cannot open {missing}: No such file or directory (is the adapter plugged in, "
                                  f"is {missing} its name? ls -l /dev/serial/by-id lists the adapters there are); retrying in 0.5 s")
    assert not any("bad line" in line for line in lines), lines
    assert delivered  # the points still say why they have no value (transport)


class _Events:
    def __init__(self) -> None:
        self.events: list[wire.Event] = []

    def append_events(self, events) -> None:  # type: ignore[no-untyped-def]
        self.events.extend(events)


FAULTY = """
[[rules]]
kind = "threshold"
id = "res.zu"
point = "radar.ZU"
levels = [ { level = "IV_BLUE", set = 1953.20, clear = 1953.15 } ]
[rules.fault]
max_step = 0.5
max_step_per_s = 60

[[rules]]
kind = "rate"
id = "res.zu.rise"
point = "radar.ZU"
window_s = 3600
per_s = 3600
levels = [ { level = "III_YELLOW", set = 0.10 } ]
[rules.fault]
max_step = 0.5
max_step_per_s = 60
"""


def test_alarm_lines_say_each_thing_once_in_one_spelling(caplog: pytest.LogCaptureFixture, capsys) -> None:
    site = Site(FAULTY, points=["radar.ZU"])
    sink = _Events()
    desk = AlarmDesk(site.engine, SystemClock(), session=1, events=sink)
    caplog.set_level(logging.WARNING, logger="yujing.alarms")
    desk.on_readings([Reading(0, T0, 1953.30)])
    desk.on_readings([Reading(0, T0 + MIN, 1962.90)])  # a 9.6 m jump in a minute: both rules fault
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "alarm res.zu raised NONE → IV_BLUE: radar.ZU = 1953.3 (set ≥ 1953.2, clear ≥ 1953.15)",
        "alarm res.zu fault (level kept at IV_BLUE): implausible step +9.6 in 60 s (allowed ±0.5)",
        "alarm res.zu.rise fault: implausible step +9.6 in 60 s (allowed ±0.5)",  # nothing "kept at NONE"
    ], lines

    # the consumer and the demo spell levels as the site file and the log do
    assert wire.LEVEL_NAMES == tuple(level.name for level in Level)
    topic = wire.parse_topic("yujing/v1/KM-RES-01/gw1/alarm")
    alarm = wire.decode_alarm(wire.encode_alarm(1, 1, sink.events))
    records = list(wire.event_records(topic, alarm, (PointInfo("radar", "ZU", "m", "uint16"),)))
    assert [(r["alarm"], r["old_level"], r["level"]) for r in records] == [
        ("raised", "NONE", "IV_BLUE"), ("fault", "IV_BLUE", "IV_BLUE"), ("fault", "NONE", "NONE")]
    capsys.readouterr()
    for r in records:
        _print_reading(r)
    shown = capsys.readouterr().out.splitlines()
    assert [line.split("  ", 1)[1] for line in shown] == [f"ALARM {r['message']}" for r in records], shown
    # an output's fault names no rule in its message: the line adds it, once
    _print_reading({"alarm": "actuator_fault", "rule": "siren", "ts": T0, "message": "bus b unit 10 coil 0: no answer"})
    assert capsys.readouterr().out.split("  ", 1)[1] == "ALARM siren actuator_fault: bus b unit 10 coil 0: no answer\n"


def test_consume_prints_a_float32_reading_without_float64_noise() -> None:
    f32 = struct.unpack("<f", struct.pack("<f", 208.69943))[0]
    assert repr(f32) == "208.69943237304688"  # what consume printed
    catalogue = [PointInfo("gnss", "east", "mm", "float32"), PointInfo("gnss", "north", "mm", "float64"),
                 PointInfo("gnss", "tiny", "mm", "float32")]
    tiny = struct.unpack("<f", struct.pack("<f", 1.17549435e-38))[0]
    prefix = "yujing/v1/KM-SLP-01/gw2"
    d = Decoder()
    d.feed(f"{prefix}/birth", wire.encode_birth(session=1, ts_ms=T0, site="KM-SLP-01", gateway="gw2", software="t",
                                                catalogue=catalogue))
    res = d.feed(f"{prefix}/data", wire.encode_data(1, 1, [Reading(0, T0, f32), Reading(1, T0, 0.1 + 0.2), Reading(2, T0, tiny)]))
    shown = [json.dumps(r["value"]) for r in res.records]
    assert shown == ["208.69943", "0.30000000000000004", "1.1754944e-38"], shown
    for r, exact in zip(res.records, (f32, None, tiny)):
        if exact is not None:  # the same float32 as the reading, to the bit
            assert struct.pack("<f", r["value"]) == struct.pack("<f", exact)
    assert wire.float32_shortest(-0.0) == 0.0 and wire.float32_shortest(3.0) == 3.0


def test_consume_help_describes_its_options_and_defaults() -> None:
    done = _cli("consume", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--broker HOST:PORT the MQTT broker to connect to" in text and "required, there is no default" in text
    assert "(default: yujing/v1/#" in text
    assert "--protocol {5,3.1.1} MQTT version" in text and "(default: 5)" in text


def test_the_demo_hint_names_a_yujing_the_shell_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    here = Path(sys.executable).parent
    if not (here / "yujing").is_file():
        pytest.skip("yujing is not installed next to this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as after scripts/demo.sh: .venv not activated
    assert yujing_command() == str((here / "yujing").absolute())
    monkeypatch.setenv("PATH", f"{here}:/usr/bin:/bin")  # activated
    assert yujing_command() == "yujing"


def test_the_examples_cite_only_documents_in_this_repository() -> None:
    import re

    headings = {m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", (ROOT / "docs" / "domain.md").read_text(), re.M)}
    for example in sorted((ROOT / "examples").glob("*.toml")):
        text = example.read_text(encoding="utf-8")
        for doc in re.findall(r"\bdocs/[\w./-]+\.md\b", text):
            assert (ROOT / doc).is_file(), (example.name, doc)
        # a document by an absolute path (a reference copy on someone's disk) is not part of the project
        assert not re.search(r"(?<![\w.])/[\w.-]+(?:/[\w.-]+)*\.(?:md|pdf|docx?|txt|html?)\b", text), example.name
        # "§7.1" is a section of docs/domain.md; deeper numbers (§5.5.2) are clauses of the standard named before them
        for section in re.findall(r"§(\d+(?:\.\d+)*)", text):
            if section.count(".") <= 1:
                assert section in headings, (example.name, section, sorted(headings))
