"""Adaptive polling: points of one device at their own intervals, faster in a season, faster while an alarm on
the device's points is up. Counted at the sink of the real scheduler, on a real pymodbus device."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import ConfigError, parse
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

from .e2e import running, site

PLC = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {port}

[[devices]]
name = "plc"
bus = "plc"
interval_s = {interval}
{extra}
  [[devices.points]]
  name = "lel"
  address = 0
  [[devices.points]]
  name = "temp"
  address = 1
  [[devices.points]]
  name = "pump"
  address = 2
{groups}

[[rules]]
kind = "threshold"
id = "gas"
point = "plc.lel"
levels = [ {{ level = "III_YELLOW", set = 25 }} ]
"""


async def _count(cfg, seconds: float, during=None) -> Counter:  # type: ignore[no-untyped-def]
    counts: Counter = Counter()
    gw = Gateway(cfg)
    sink = gw._sink

    def counting(readings):  # type: ignore[no-untyped-def]
        for r in readings:
            counts[cfg.catalogue[r.point].name] += 1
        sink(readings)

    gw._sink = counting  # type: ignore[method-assign]
    async with running(gw):
        if during is not None:
            await during(gw)
        await asyncio.sleep(seconds)
    return counts


@pytest.fixture
async def plc():  # type: ignore[no-untyped-def]
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    yield server, port
    await server.stop()


async def test_point_groups_poll_at_their_own_interval(mosquitto, tmp_path: Path, plc) -> None:  # type: ignore[no-untyped-def]
    server, port = plc
    groups = '[[devices.groups]]\npoints = ["lel"]\ninterval_s = 0.1'
    cfg = site(mosquitto.port, tmp_path, PLC.format(port=port, interval=1.0, extra="", groups=groups))
    counts = await _count(cfg, 2.0)
    assert counts["lel"] >= 12 and counts["temp"] <= 4 and counts["temp"] == counts["pump"], counts


async def test_an_alarm_on_the_device_shortens_its_interval_and_the_end_of_it_lengthens_it(mosquitto, tmp_path: Path, plc) -> None:  # type: ignore[no-untyped-def]
    server, port = plc
    cfg = site(mosquitto.port, tmp_path, PLC.format(port=port, interval=1.0, extra='alarm_interval_s = 0.1\nalarm_level = "III_YELLOW"', groups=""))
    lel = cfg.devices[0].points[0]
    await server.set_point(1, lel, 5)
    calm = await _count(cfg, 2.0)

    async def alarm(gw):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        await server.set_point(1, lel, 40)
        await asyncio.sleep(1.2)  # the slow poll sees it within a second; from then on every 0.1 s

    alarmed = await _count(cfg, 1.0, during=alarm)
    assert calm["temp"] <= 4 and alarmed["temp"] >= 10, (calm, alarmed)


async def test_a_season_shortens_the_interval(mosquitto, tmp_path: Path, plc) -> None:  # type: ignore[no-untyped-def]
    server, port = plc
    today = datetime.now(timezone(timedelta(hours=8)))
    start, end = today - timedelta(days=1), today + timedelta(days=2)
    season = f'season = {{ start = "{start:%m-%d}", end = "{end:%m-%d}", utc_offset = "+08:00", interval_s = 0.1 }}'
    out = f'season = {{ start = "{(today + timedelta(days=40)):%m-%d}", end = "{(today + timedelta(days=60)):%m-%d}", utc_offset = "+08:00", interval_s = 0.1 }}'
    inside = await _count(site(mosquitto.port, tmp_path, PLC.format(port=port, interval=1.0, extra=season, groups="")), 1.5)
    outside = await _count(site(mosquitto.port, tmp_path / "x", PLC.format(port=port, interval=1.0, extra=out, groups="")), 1.5)
    assert inside["temp"] >= 10 and outside["temp"] <= 3, (inside, outside)


def test_group_and_season_mistakes_are_named(tmp_path: Path) -> None:
    groups = '[[devices.groups]]\npoints = ["lel", "nope"]\ninterval_s = 1\n[[devices.groups]]\npoints = ["lel"]\ninterval_s = 2'
    body = PLC.format(port=502, interval=1.0, extra='season = { start = "06-01 10:00", end = "06-01 10:00", utc_offset = "+08:00", interval_s = 1 }', groups=groups)
    with pytest.raises(ConfigError) as info:
        parse(f'[site]\nid = "S"\ngateway = "g"\n[uplink]\nhost = "127.0.0.1"\ntls = false\n{body}', "site.toml")
    lines = "\n".join(info.value.lines())
    assert "devices[0].groups[0].points[1]: no point 'nope'" in lines
    assert "devices[0].groups[1].points[0]: 'lel' is already in groups[0]" in lines
    assert "devices[0].season.end: the window is empty" in lines
