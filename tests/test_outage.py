"""Store and forward through long outages, restarts of the broker, and kill -9 of the gateway."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections import defaultdict
from pathlib import Path

from gateway.app import Gateway
from gateway.spool import Spool
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

from .e2e import Collector, FastClock, collecting, register, running, site

T0 = 1_780_000_000_000  # 2026-05-28


def body(modbus_port: int, points: int, interval_s: float) -> str:
    return (
        f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {modbus_port}\n\n'
        f'[[devices]]\nname = "slope"\nbus = "plc"\nunit = 1\ninterval_s = {interval_s}\n'
        + "".join(f'  [[devices.points]]\n  name = "p{i:02d}"\n  address = {i}\n' for i in range(points))
    )


def check_delivery(records: list[dict], points: int) -> tuple[int, int]:
    """Every reading exactly once (or flagged as a duplicate), and per point in time order within each lane."""
    seen: set[tuple[str, int]] = set()
    per_point: dict[tuple[str, bool], list[int]] = defaultdict(list)
    duplicates = 0
    for r in records:
        if "point" not in r:
            continue
        key = (r["point"], r["ts"])
        if r.get("duplicate"):
            duplicates += 1
            continue
        assert key not in seen, f"reading {key} delivered twice without a duplicate flag"
        seen.add(key)
        per_point[(r["point"], bool(r.get("historical")))].append(r["ts"])
    for (point, _), times in per_point.items():
        assert times == sorted(times), f"{point}: out of order"
    assert len({p for p, _ in seen}) == points
    return len(seen), duplicates


async def test_72_hour_outage_then_every_reading_exactly_once(private_mosquitto, tmp_path: Path) -> None:
    points, hours = 50, 72
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    cfg = site(private_mosquitto.port, tmp_path, body(port, points, 60.0))
    clock = FastClock(T0)
    private_mosquitto.stop()
    polls = hours * 60
    try:
        gw = Gateway(cfg, clock=clock)
        async with running(gw):  # the outage: three days of polls go to the spool
            while gw.readings < polls * points:
                await asyncio.sleep(0.05)
        spool = Spool(cfg.spool.path)  # the gateway has stopped: the spool is free to look at
        backlog = spool.backlog()
        spool.close()
        private_mosquitto.start()
        gw2 = Gateway(cfg)  # restarted (on real time, which is later than the outage), the link is back
        async with collecting(private_mosquitto.port) as col, running(gw2):
            await col.wait_for(lambda c: gw2.spool is not None and gw2.readings > 0 and gw2.spool.backlog() < 2 * points and not gw2.spool.unsent(), timeout=120)
            await col.wait_for(lambda c: sum(1 for r in c.records if "point" in r) >= gw.readings, timeout=60)
        total = gw.readings + gw2.readings
    finally:
        await server.stop()
    assert backlog == gw.readings >= polls * points  # everything polled during the outage was spooled
    delivered, duplicates = check_delivery(col.records, points)
    assert gw.readings <= delivered <= total
    assert total - delivered <= 2 * points  # at most the last polls still waiting in the spool
    seqs = sorted({r["seq"] for r in col.records if "point" in r})
    assert seqs == list(range(1, len(seqs) + 1))
    hist = [r for r in col.records if "point" in r and r.get("historical")]
    assert len(hist) >= (polls - 2) * points  # all but the newest flagged historical
    span_h = (max(r["ts"] for r in col.records if "point" in r) - min(r["ts"] for r in col.records if "point" in r)) / 3.6e6
    assert span_h >= hours - 0.1


KILLER = """
import asyncio, sys
from pathlib import Path
from gateway.config import load
from gateway.app import Gateway, run_until_signalled
asyncio.run(run_until_signalled(Gateway(load(Path(sys.argv[1])))))
"""


async def test_twenty_kill_9s_during_outage_and_drain_lose_nothing(private_mosquitto, tmp_path: Path) -> None:
    points = 20
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    cfg_path = tmp_path / "site.toml"
    cfg_text = f"""
[site]
id = "TEST-01"
gateway = "gw1"
[uplink]
host = "127.0.0.1"
port = {private_mosquitto.port}
tls = false
batch_max = 40
batch_delay_s = 0
backoff_min_s = 0.1
backoff_max_s = 0.3
[spool]
path = "{tmp_path / 'spool'}"
{body(port, points, 0.05)}
"""
    cfg_path.write_text(cfg_text)
    rng = random.Random(20)
    await register(private_mosquitto.port, "platform")  # a persistent session: nothing is missed while away
    private_mosquitto.stop()
    kills = 0

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(sys.executable, "-c", KILLER, str(cfg_path),
                                                    stderr=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)

    col = Collector(private_mosquitto.port, client_id="platform")
    try:
        proc = await start()
        for _ in range(10):  # outage: the spool fills
            await asyncio.sleep(rng.uniform(0.3, 0.9))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1
            proc = await start()
        private_mosquitto.start()
        collector = asyncio.create_task(col.run())
        await asyncio.wait_for(col.ready.wait(), 5)
        for _ in range(10):  # the drain
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1
            proc = await start()
        await asyncio.sleep(3.0)  # the last run drains what the kills left behind
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        await asyncio.sleep(0.5)
        collector.cancel()
    finally:
        await server.stop()
    assert kills == 20
    spool = Spool(tmp_path / "spool")
    left = spool.backlog() + len(spool.unsent(limit=10**6))
    spool.close()
    delivered, duplicates = check_delivery(col.records, points)
    seqs = sorted({r["seq"] for r in col.records if "point" in r})
    assert seqs == list(range(1, seqs[-1] + 1)), "a sealed message was lost"
    assert left <= 2 * 40 + points  # only what the final clean run had just polled may wait for the next start
    assert delivered > 0
    sessions = {r["session"] for r in col.records if "point" in r}
    assert len(sessions) >= 10  # readings from most of the 22 runs arrived (a run killed during start-up polls nothing)


async def test_backlog_drains_at_the_configured_rate_while_live_readings_flow(mosquitto, tmp_path: Path) -> None:
    import time

    from gateway.model import PointInfo, Reading

    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    cfg = site(mosquitto.port, tmp_path, body(port, 5, 0.2), uplink_extra="drain_rate = 1000\nbatch_max = 100")
    spool = Spool(cfg.spool.path)  # an outage's worth of readings, from an earlier session
    spool.start_session([PointInfo("slope", f"p{i:02d}", "", "uint16") for i in range(5)], T0)
    for k in range(600):
        spool.append(1, [Reading(i, T0 + k * 60_000, k) for i in range(5)])
    spool.close()
    arrivals: list[tuple[float, bool, int]] = []
    try:
        async with collecting(mosquitto.port) as col:
            original = col.decoder.feed

            def feed(topic: str, payload: bytes):  # type: ignore[no-untyped-def]
                res = original(topic, payload)
                for r in res.records:
                    if "point" in r:
                        arrivals.append((time.monotonic(), bool(r.get("historical")), r["session"]))
                return res

            col.decoder.feed = feed  # type: ignore[method-assign]
            async with running(Gateway(cfg)):
                await col.wait_for(lambda c: sum(1 for a in arrivals if a[1]) >= 3000, timeout=20)
    finally:
        await server.stop()
    backlog = [t for t, hist, session in arrivals if hist and session == 1]
    live = [t for t, hist, session in arrivals if not hist]
    took = backlog[-1] - backlog[0]
    # 3,000 readings at 1,000/s, the first 1,000 at once (a full bucket): about 2 s, not a burst
    assert 1.6 <= took <= 6.0, took
    assert sum(1 for t in live if backlog[0] < t < backlog[-1]) >= 5  # live readings kept flowing meanwhile
