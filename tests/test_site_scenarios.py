"""Site scenarios end to end on a virtual clock: the reservoir's flood-limit rule in and out of the flood
season, and a creeping crack meter whose rate rules fire. Real pymodbus devices whose values follow a
scripted curve of the virtual time, the real gateway, a real mosquitto."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path

from device_drivers.registers import encode_words
from gateway.app import Gateway
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

from .e2e import FastClock, collecting, running, site

CST = timezone(timedelta(hours=8))

RESERVOIR = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {port}

[[devices]]
name = "radar"
bus = "plc"
unit = 1
interval_s = 60
  [[devices.points]]
  name = "ZU"
  address = 1
  scale = -0.001
  offset = 1963.0
  unit = "m"

[[rules]]
kind = "threshold"
id = "res.zu.flood_limit"
point = "radar.ZU"
levels = [ {{ level = "IV_BLUE", set = 1953.20, clear = 1953.15 }}, {{ level = "III_YELLOW", set = 1953.50, clear = 1953.45 }} ]
window = {{ start = "06-01", end = "10-31", utc_offset = "+08:00" }}
"""


async def run_hydrograph(mosquitto, tmp_path: Path, start: datetime) -> list[dict]:  # type: ignore[no-untyped-def]
    """The level rises 0.1 m/h from 1953.00 m for 8 hours of virtual time, polled every minute."""
    port = free_port()
    clock = FastClock(int(start.timestamp() * 1000))
    cfg = site(mosquitto.port, tmp_path, RESERVOIR.format(port=port))
    gap_point = cfg.devices[0].points[0]

    def radar(registers: list[int]) -> None:
        level_m = 1953.00 + 0.1 * clock.t / 3600
        registers[gap_point.address] = round((1963.0 - level_m) * 1000)  # ZU = 1963.000 − gap/1000

    server = SimServer([SimSlave(1, before_read=radar)], tcp=("127.0.0.1", port))
    await server.start()
    try:
        async with collecting(mosquitto.port, "yujing/v1/TEST-01/gw1/#") as col:
            async with running(Gateway(cfg, clock=clock, tick_s=None)) as gw:
                while gw.readings < 8 * 60:
                    await asyncio.sleep(0.02)
            await col.wait_for(lambda c: sum(1 for r in c.records if "point" in r) >= 8 * 60, timeout=30)
    finally:
        await server.stop()
    return col.records


async def test_flood_limit_rule_in_the_flood_season(mosquitto, tmp_path: Path) -> None:
    start = datetime(2026, 7, 15, 0, 0, tzinfo=CST)
    records = await run_hydrograph(mosquitto, tmp_path, start)
    alarms = [r for r in records if "alarm" in r]
    assert [(a["alarm"], a["level"]) for a in alarms] == [("raised", "IV_BLUE"), ("escalated", "III_YELLOW")]
    # 1953.00 + 0.1 m/h: 1953.20 after 2 h, 1953.50 after 5 h (to the minute of the poll)
    hours = [(a["ts"] - start.timestamp() * 1000) / 3.6e6 for a in alarms]
    assert abs(hours[0] - 2.0) <= 1 / 60 + 1e-9 and abs(hours[1] - 5.0) <= 1 / 60 + 1e-9, hours
    assert alarms[1]["values"] == {"radar.ZU": 1953.5}


async def test_flood_limit_rule_out_of_season_stays_silent(mosquitto, tmp_path: Path) -> None:
    records = await run_hydrograph(mosquitto, tmp_path, datetime(2026, 11, 15, 0, 0, tzinfo=CST))
    assert max(r["value"] for r in records if r.get("point") == "ZU") >= 1953.7  # the level did rise
    assert [r for r in records if "alarm" in r] == []


CRACK = """
[[buses]]
name = "rs485"
type = "tcp"
host = "127.0.0.1"
port = {port}

[[devices]]
name = "crack"
bus = "rs485"
unit = 2
interval_s = 600
  [[devices.points]]
  name = "opening"
  address = 3
  type = "int32"
  scale = 0.01
  unit = "mm"

[[rules]]
kind = "rate"
id = "slope.crack.rate_day"
point = "crack.opening"
window_s = 86400
per_s = 86400
direction = "rise"
levels = [ {{ level = "III_YELLOW", set = 2.0, clear = 1.5 }}, {{ level = "II_ORANGE", set = 10.0, clear = 8.0 }} ]
"""


async def test_creeping_crack_meter_fires_its_rate_rule(mosquitto, tmp_path: Path) -> None:
    """Creep at 1 mm/day for 3 days, then 4 mm/day for 2 days, then 15 mm/day: yellow, then orange."""
    port = free_port()
    start = datetime(2026, 8, 1, tzinfo=CST)
    clock = FastClock(int(start.timestamp() * 1000))
    cfg = site(mosquitto.port, tmp_path, CRACK.format(port=port))
    point = cfg.devices[0].points[0]

    def opening_mm(days: float) -> float:
        if days <= 3:
            return 12.0 + days
        if days <= 5:
            return 15.0 + 4 * (days - 3)
        return 23.0 + 15 * (days - 5)

    def crack(registers: list[int]) -> None:
        raw = round(opening_mm(clock.t / 86400) * 100)
        registers[point.address : point.address + 2] = encode_words(point, raw)

    server = SimServer([SimSlave(2, before_read=crack)], tcp=("127.0.0.1", port))
    await server.start()
    polls = 7 * 24 * 6  # a week of 10-minute polls
    try:
        async with collecting(mosquitto.port, "yujing/v1/TEST-01/gw1/#") as col:
            async with running(Gateway(cfg, clock=clock, tick_s=None)) as gw:
                while gw.readings < polls:
                    await asyncio.sleep(0.02)
            await col.wait_for(lambda c: len([r for r in c.records if "alarm" in r]) >= 2, timeout=30)
    finally:
        await server.stop()
    alarms = [r for r in col.records if "alarm" in r]
    assert [(a["alarm"], a["level"]) for a in alarms[:2]] == [("raised", "III_YELLOW"), ("escalated", "II_ORANGE")]
    days = [(a["ts"] - start.timestamp() * 1000) / 8.64e7 for a in alarms[:2]]
    # yellow once the 24 h rise passes 2 mm: during the 4 mm/day stretch (day 3..5); orange during the 15 mm/day one
    assert 3.0 < days[0] < 5.0 and 5.0 < days[1] < 6.5, days
