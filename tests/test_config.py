"""Site configuration: a valid file loads; each broken one fails with an error naming file, line and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import ConfigError, load, parse

ROOT = Path(__file__).parent.parent

GOOD = """\
[site]
id = "KM-RES-01"
gateway = "gw1"

[uplink]
host = "127.0.0.1"
tls = false

[[buses]]
name = "a"
type = "rtu"
port = "/dev/ttyUSB0"
baudrate = 9600

[[buses]]
name = "plc"
type = "tcp"
host = "192.0.2.10"

[[devices]]
name = "radar"
bus = "a"
unit = 1
interval_s = 60
  [[devices.points]]
  name = "gap"
  address = 1
  unit = "mm"

[[devices]]
name = "midas"
bus = "plc"
unit = 1
interval_s = 1
  [[devices.points]]
  name = "conc"
  address = 2
  type = "float32"
  word_order = "little"
"""


def test_good_config_loads() -> None:
    cfg = parse(GOOD, "site.toml")
    assert cfg.site.id == "KM-RES-01"
    assert [d.name for d in cfg.devices] == ["radar", "midas"]
    assert [(p.device, p.name) for p in cfg.catalogue] == [("radar", "gap"), ("midas", "conc")]
    assert cfg.uplink.client_id == "yujing-KM-RES-01-gw1"
    assert cfg.buses[0].settings.baudrate == 9600  # type: ignore[union-attr]


BROKEN = [
    # (what the test changes, replacement, expected line, expected message fragment)
    ("unknown key", ('unit = "mm"', 'unit = "mm"\n  colour = "red"'), 29, "devices[0].points[0].colour: unknown key"),
    ("wrong type", ("interval_s = 60", 'interval_s = "60"'), 24, "devices[0].interval_s: expected an integer or a number, got string"),
    ("poll interval 0", ("interval_s = 60", "interval_s = 0"), 24, "devices[0].interval_s: invalid value 0: must be more than 0 seconds"),
    ("same unit twice on a bus", ('name = "midas"\nbus = "plc"', 'name = "midas"\nbus = "a"'), 33, "devices[1].unit: unit 1 on bus 'a' is already used by 'radar'"),
    ("two baud rates on one port", ('name = "plc"\ntype = "tcp"\nhost = "192.0.2.10"', 'name = "b"\ntype = "rtu"\nport = "/dev/ttyUSB0"\nbaudrate = 4800'), 19, "buses[1].baudrate: port /dev/ttyUSB0 is also bus 'a' at baudrate 9600, here 4800"),
    ("overlap that disagrees", ('  unit = "mm"', '  unit = "mm"\n  [[devices.points]]\n  name = "gap32"\n  address = 0\n  type = "int32"'), 31, "devices[0].points[1].address: gap32 (int32 at 0..1) overlaps gap (uint16 at 1..1)"),
    ("unknown bus", ('bus = "plc"', 'bus = "plx"'), 32, "devices[1].bus: no bus named 'plx' (buses: a, plc)"),
    ("bad data type", ('type = "float32"', 'type = "float31"'), 38, "devices[1].points[0].type: invalid value 'float31'"),
    ("bool on a register", ('type = "float32"', 'type = "bool"'), 38, "bool is for coils and discrete inputs"),
    ("bit without bit", ('type = "float32"', 'type = "bit"'), None, 'type "bit" needs bit = 0..15'),
    ("bad word order", ('word_order = "little"', 'word_order = "CDAB"'), 39, "devices[1].points[0].word_order: invalid value 'CDAB'"),
    ("unit out of range", ("unit = 1\ninterval_s = 1", "unit = 300\ninterval_s = 1"), 33, "devices[1].unit: invalid value 300: 1..247 on a serial bus, 0..255 over TCP"),
    ("address out of range", ("address = 2", "address = 70000"), 37, "devices[1].points[0].address: invalid value 70000"),
    ("too many registers per request", ("interval_s = 1\n", "interval_s = 1\nmax_registers = 200\n"), 35, "devices[1].max_registers: invalid value 200: 1..125"),
    ("inline password", ("tls = false", 'tls = false\npassword = "hunter2"'), 8, "uplink.password: secrets are not written inline"),
    ("plaintext to a remote broker", ('host = "127.0.0.1"', 'host = "broker.example.cn"'), 7, "uplink.tls: TLS is off for broker.example.cn"),
    ("missing site id", ('id = "KM-RES-01"\n', ""), 1, "site.id: missing (required)"),
    ("MQTT wildcard in an id", ('gateway = "gw1"', 'gateway = "gw/1"'), 3, "site.gateway: invalid value 'gw/1'"),
    ("duplicate point", ('word_order = "little"', 'word_order = "little"\n  [[devices.points]]\n  name = "conc"\n  address = 9'), 41, "devices[1].points[1].name: point 'conc' is already defined at points[0]"),
    ("syntax error", ("interval_s = 60", "interval_s = = 60"), 24, "(syntax)"),
]


@pytest.mark.parametrize(("what", "change", "line", "fragment"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_names_the_fault(what: str, change: tuple[str, str], line: int | None, fragment: str) -> None:
    old, new = change
    assert old in GOOD, f"test setup: {old!r} not in GOOD"
    text = GOOD.replace(old, new, 1)
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    messages = info.value.lines()
    hit = [m for m in messages if fragment in m]
    assert hit, f"{what}: expected {fragment!r} in {messages}"
    assert hit[0].startswith("site.toml:")
    if line is not None:
        assert hit[0].startswith(f"site.toml:{line}: "), hit[0]


def test_all_problems_are_reported_at_once() -> None:
    text = GOOD.replace("interval_s = 60", "interval_s = 0").replace('word_order = "little"', 'word_order = "x"')
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    assert len(info.value.problems) == 2


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "gw.pass"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    site = tmp_path / "site.toml"
    site.write_text(GOOD.replace("tls = false", 'tls = false\nusername = "gw1"\npassword_file = "gw.pass"'))
    with pytest.raises(ConfigError, match=r"gw.pass is readable by others \(mode 0644\); run: chmod 600"):
        load(site)
    os.chmod(secret, 0o600)
    cfg = load(site)
    assert cfg.uplink.password_file == secret
    assert "s3cret" not in repr(cfg)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml: \(file\): cannot read"):
        load(tmp_path / "nope.toml")


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_load(example: Path) -> None:
    cfg = load(example)
    assert cfg.devices and cfg.catalogue


def test_examples_exist() -> None:
    names = {p.stem for p in (ROOT / "examples").glob("*.toml")}
    assert {"reservoir", "slope", "chemical-park"} <= names


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (("unit = 1\ninterval_s = 60", "unit = 0\ninterval_s = 60"), "devices[0].unit: unit 0 on serial bus 'a': RS-485 slaves are 1..247"),
        (("[site]\nid = \"KM-RES-01\"\ngateway = \"gw1\"\n", 'site = "x"\n'), "site: expected a table, got string"),
    ],
)
def test_more_mistakes_a_technician_makes(change: tuple[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(GOOD.replace(*change), "site.toml")
    assert any(fragment in line for line in info.value.lines()), info.value.lines()
    assert not any("NoneType" in line for line in info.value.lines())


def test_password_file_needs_a_username_and_must_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "gw.pass").write_text("x")
    os.chmod(tmp_path / "gw.pass", 0o600)
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="a password without a username is never sent"):
        parse(GOOD.replace("tls = false", 'tls = false\npassword_file = "gw.pass"'), "site.toml", base=tmp_path)
    with pytest.raises(ConfigError, match="dir is not a file"):
        parse(GOOD.replace("tls = false", 'tls = false\nusername = "u"\npassword_file = "dir"'), "site.toml", base=tmp_path)


def test_problems_are_listed_in_file_order() -> None:
    text = GOOD.replace('word_order = "little"', 'word_order = "x"').replace('gateway = "gw1"', 'gateway = "gw1"\nfoo = 1')
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    lines = [p.line for p in info.value.problems]
    assert lines == sorted(lines) and len(lines) == 2


RULES = """
[[rules]]
kind = "threshold"
id = "r.one"
point = "radar.nope"
levels = [ { level = "IV_BLUE", set = 1 } ]

[[rules]]
kind = "threshold"
id = "r.two"
point = "midas.nothing"
levels = [ { level = "IV_BLUE", set = 1 } ]

[[rules]]
kind = "threshold"
id = "r.three"
point = "radar.gap"
levlels = [ { level = "IV_BLUE", set = 1 } ]

[[actions]]
kind = "coil"
name = "siren"
when = { rules = ["r.*"], level = "II_ORANGE" }
bus = "plc"
unit = 1
address = 0

[[actions]]
kind = "coil"
name = "beacon"
when = { rules = ["x.*"], level = "II_ORANGE" }
bus = "plc"
unit = 1
address = 1
"""


def test_every_problem_in_rules_devices_and_actions_is_reported_together() -> None:
    """Two bad rule points are two problems; a duplicate unit does not hide them; a typo neither; the
    actions are checked too (without echoing the rules' errors)."""
    text = GOOD.replace('name = "midas"\nbus = "plc"\nunit = 1', 'name = "midas"\nbus = "plc"\nunit = 1\nintervall_s = 1') + RULES
    text = text.replace('[[devices]]\nname = "midas"', '[[devices]]\nname = "twin"\nbus = "a"\nunit = 1\ninterval_s = 1\n  [[devices.points]]\n  name = "x"\n  address = 9\n\n[[devices]]\nname = "midas"')
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    lines = info.value.lines()
    assert any("rules[0].point: unknown point 'radar.nope'" in line for line in lines), lines
    assert any("rules[1].point: unknown point 'midas.nothing'" in line for line in lines), lines
    assert any("rules[2].levels: missing required key (is 'levlels' a typo for it?)" in line for line in lines), lines
    assert any("devices[1].unit: unit 1 on bus 'a' is already used by 'radar'" in line for line in lines), lines
    assert any("devices[2].intervall_s: unknown key (did you mean 'interval_s'?)" in line for line in lines), lines
    assert any("actions[1].when.rules[0]: no rule id matches 'x.*'" in line for line in lines), lines
    assert not any("actions[0]" in line for line in lines), lines  # 'r.*' matches declared rules, broken or not
    assert len(lines) == 6, lines


def test_mistakes_in_the_new_bus_types_scheduling_and_uplinks_are_named(tmp_path: Path) -> None:
    """Each of these passed `yujing check` once and then did nothing, or failed only at the site."""
    pin = tmp_path / "sim.pin"
    pin.write_text("1234\n")
    os.chmod(pin, 0o644)
    text = """
[site]
id = "S"
gateway = "g"
[uplink]
host = "127.0.0.1"
tls = false

[[buses]]
name = "hydro"
type = "sl651"
port = "/dev/ttyX9"
centre = 1
[[buses]]
name = "rtu"
type = "rtu"
port = "/dev/ttyX9"
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"

[[devices]]
name = "station"
bus = "hydro"
station = "0053010001"
interval_s = 3600
retries = 2
  [[devices.points]]
  name = "z"
  element = "ZU"
[[devices]]
name = "station2"
bus = "hydro"
station = "0053010002"
interval_s = 3600
  [[devices.points]]
  name = "z"
  element = "ZU"
  [[devices.points]]
  name = "z"
  element = "PJ"
[[devices]]
name = "pump"
bus = "plc"
interval_s = 10
alarm_interval_s = 20
season = { start = "06-01", end = "10-31", interval_s = 60, utc_ofset = "+08:00" }
  [[devices.points]]
  name = "running"
  address = 0
[[devices]]
name = "valve"
bus = "plc"
unit = 2
interval_s = 10
alarm_level = "II_ORANGE"
season = { start = "06-01", end = "10-31", utc_offset = "+08:00", interval_s = 60 }
  [[devices.points]]
  name = "open"
  address = 0

[[actions]]
kind = "coil"
name = "siren"
when = { rules = ["*"] }
bus = "hydro"
unit = 1
address = 0

[[uplinks]]
kind = "sms"
name = "duty/#"
port = "/dev/ttyUSB2"
recipients = [ { name = "a", number = "+8613800000001" } ]
[[uplinks]]
kind = "sms"
name = "duty"
port = "/dev/ttyUSB2"
pin_file = "sim.pin"
recipients = [ { name = "a", number = "+8613800000001" } ]
"""
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml", base=tmp_path)
    lines = "\n".join(info.value.lines())
    assert "buses[1].port: port /dev/ttyX9 is already bus 'hydro' of type 'sl651'" in lines
    assert "devices[1].points[1].name: point 'z' is already defined" in lines
    assert "devices[0].retries: 'station' is never polled (it sends by itself), so retries has no effect" in lines
    assert "devices[2].alarm_interval_s: 20 s is not shorter than interval_s (10 s)" in lines
    assert "devices[2].season.utc_offset: missing required key (is 'utc_ofset' a typo for it?)" in lines
    assert "devices[3].season.interval_s: 60 s is not shorter than interval_s (10 s)" in lines
    assert "devices[3].alarm_level: is the level from which alarm_interval_s applies" in lines
    assert "uplinks[0].name: 'duty/#'" in lines
    assert f"uplinks[1].pin_file: {pin} is readable by others (mode 0644)" in lines  # resolved next to the site file
    assert len(info.value.problems) >= 9


def test_an_output_on_a_bus_that_is_not_modbus_is_refused() -> None:
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
port = "/dev/ttyX8"
[[devices]]
name = "ldm"
bus = "line"
interval_s = 1
mode = "poll"
command = "D\\r\\n"
  [[devices.points]]
  name = "d"
  field = 0
[[rules]]
kind = "threshold"
id = "r"
point = "ldm.d"
levels = [ { level = "III_YELLOW", set = 1 } ]
[[actions]]
kind = "coil"
name = "siren"
when = { rules = ["r"], level = "III_YELLOW" }
bus = "line"
unit = 1
address = 0
"""
    with pytest.raises(ConfigError) as info:
        parse(text, "site.toml")
    assert "bus 'line' is of type 'serial_line': coil and register outputs are written over Modbus" in "\n".join(info.value.lines())
