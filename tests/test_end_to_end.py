"""End to end with real parts: pymodbus servers (TCP, and RTU over pseudo-terminals), the gateway,
a real mosquitto on loopback, and the reference consumer."""

from __future__ import annotations

import asyncio
import shutil
import signal
import struct
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import aiomqtt
import pycddl
import pytest

from device_drivers.registers import Table
from gateway import wire
from gateway.app import Gateway
from gateway.model import PointInfo, Reading
from gateway.sim.devices import SimServer, SimSlave
from gateway.sim.ptybridge import PtyBridge
from tests.conftest import free_port, wait_port

from .e2e import collecting, register, running, site

ROOT = Path(__file__).parent.parent
SCHEMA = pycddl.Schema((ROOT / "docs" / "wire-format.cddl").read_text())

ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]
RAW = {
    "int16": -1234,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3123456789,
    "float32": -0.15625,
    "int64": -1234567890123,
    "uint64": 12345678901234567890,
    "float64": -1953.383,
}


def all_types_body(port: int) -> str:
    lines = [
        f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\ntimeout_s = 0.5\n',
        '[[devices]]\nname = "all"\nbus = "plc"\nunit = 1\ninterval_s = 0.2\nmax_gap = 3\n',
    ]
    address = 0
    for t in RAW:
        for b, w in ORDERS:
            lines.append(f'  [[devices.points]]\n  name = "{t}_{b[0]}{w[0]}"\n  address = {address}\n  type = "{t}"\n'
                         f'  byte_order = "{b}"\n  word_order = "{w}"\n')
            address += 4
    lines.append('  [[devices.points]]\n  name = "level"\n  address = 200\n  scale = -0.001\n  offset = 1963.0\n  unit = "m"\n')
    lines.append('  [[devices.points]]\n  name = "status_lost"\n  table = "input"\n  address = 3\n  type = "bit"\n  bit = 5\n')
    lines.append('  [[devices.points]]\n  name = "siren"\n  table = "coil"\n  address = 0\n')
    lines.append('  [[devices.points]]\n  name = "door"\n  table = "discrete"\n  address = 2\n')
    return "\n".join(lines)


async def test_every_type_and_order_arrives_exactly(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    slave = SimSlave(1)
    server = SimServer([slave], tcp=("127.0.0.1", port))
    await server.start()
    cfg = site(mosquitto.port, tmp_path, all_types_body(port))
    points = {p.name: p for p in cfg.devices[0].points}
    typed = {p.name for p in cfg.devices[0].points if p.table is Table.HOLDING and p.address < 200}
    for p in cfg.devices[0].points:
        if p.name in typed:
            await server.set_raw(1, p, RAW[p.type])
    await server.set_raw(1, points["level"], 9617)
    await server.set_raw(1, points["status_lost"], True)
    await server.set_raw(1, points["siren"], True)
    await server.set_raw(1, points["door"], True)
    slave.requests.clear()  # count only what arrives over the wire from here on
    try:
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await col.wait_for(lambda c: len({r["point"] for r in c.records}) == len(points))
        polls = gw.schedulers[0].pollers[0].polls
    finally:
        await server.stop()
    for name, p in points.items():
        rec = col.latest("all", name)
        assert rec is not None and rec["quality"] == "good", (name, rec)
        if name in typed:
            expected = RAW[p.type]
            if p.type == "float32":
                expected = struct.unpack(">f", struct.pack(">f", expected))[0]
            assert rec["value"] == expected, name
    assert col.latest("all", "level")["value"] == 1953.383 and col.latest("all", "level")["unit"] == "m"
    assert col.latest("all", "status_lost")["value"] is True
    assert col.latest("all", "siren")["value"] is True and col.latest("all", "door")["value"] is True
    # Coalescing: 36 points; holding 0..127 (gaps ≤ max_gap 3) takes two reads (125 + 3), 200 a third;
    # input, coil and discrete one each: 6 reads per poll instead of 36.
    assert polls >= 1
    assert slave.reads == 6 * polls, f"{slave.reads} reads in {polls} polls for {len(points)} points"
    # Every payload the broker carried validates against the CDDL schema.
    assert col.payloads
    for topic, payload in col.payloads:
        SCHEMA.validate_cbor(payload)
    assert not [n for n in col.notices if "gap" in n or "duplicate" in n or "rejected" in n]


async def test_coalescing_counts_requests_on_the_server(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    slave = SimSlave(1)
    server = SimServer([slave], tcp=("127.0.0.1", port))
    await server.start()
    body = f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\n\n' \
           '[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = 0.1\nmax_gap = 3\n' + "".join(
               f'  [[devices.points]]\n  name = "r{a}"\n  address = {a}\n' for a in [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 40, 41]
           )
    cfg = site(mosquitto.port, tmp_path, body)
    try:
        async with running(Gateway(cfg)) as gw:
            await asyncio.sleep(1.0)
        polls = gw.schedulers[0].pollers[0].polls
    finally:
        await server.stop()
    assert polls >= 3
    # 14 points: 0..13 in one read (gap of 2 ≤ max_gap 3), 40..41 in another.
    assert slave.reads == 2 * polls


async def test_rtu_over_socat_two_units(mosquitto, tmp_path: Path) -> None:
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed: scripts/test.sh installs it (apt-get install socat)")
    a, b = tmp_path / "ttyGW", tmp_path / "ttyDEV"
    proc = subprocess.Popen([socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if a.exists() and b.exists():
                break
            await asyncio.sleep(0.05)
        server = SimServer([SimSlave(1), SimSlave(2)], serial={"port": str(b), "baudrate": 9600})
        await server.start()
        body = f"""
[[buses]]
name = "rs485"
type = "rtu"
port = "{a}"
baudrate = 9600
timeout_s = 0.3

[[devices]]
name = "radar"
bus = "rs485"
unit = 1
interval_s = 0.3
  [[devices.points]]
  name = "gap"
  address = 1
  unit = "mm"

[[devices]]
name = "rain"
bus = "rs485"
unit = 2
interval_s = 0.3
  [[devices.points]]
  name = "total"
  address = 0
  type = "uint32"
  scale = 0.1
  unit = "mm"
"""
        cfg = site(mosquitto.port, tmp_path, body)
        await server.set_raw(1, cfg.devices[0].points[0], 9617)
        await server.set_raw(2, cfg.devices[1].points[0], 1234)
        try:
            async with collecting(mosquitto.port) as col, running(Gateway(cfg)):
                await col.wait_for(lambda c: c.latest("radar", "gap") is not None and c.latest("rain", "total") is not None)
        finally:
            await server.stop()
    finally:
        proc.terminate()
        proc.wait(5)
    assert col.latest("radar", "gap")["value"] == 9617
    assert col.latest("rain", "total")["value"] == 123.4


RTU_BUS = """
[[buses]]
name = "rs485"
type = "rtu"
port = "{port}"
baudrate = 19200
timeout_s = 0.15
pause_s = 0.005

[[devices]]
name = "gas1"
bus = "rs485"
unit = 11
interval_s = 0.25
retries = 1
offline_after = 2
backoff_max_s = 2
  [[devices.points]]
  name = "conc"
  address = 1
  unit = "ppm"

[[devices]]
name = "gas2"
bus = "rs485"
unit = 12
interval_s = 0.25
  [[devices.points]]
  name = "conc"
  address = 1
  unit = "ppm"
"""


async def test_dead_device_goes_offline_while_the_other_keeps_its_rate(mosquitto, tmp_path: Path, caplog) -> None:
    bridge = PtyBridge(response_timeout=0.15)
    bridge.start()
    server = SimServer([SimSlave(11), SimSlave(12)], serial={"port": bridge.device_port, "baudrate": 19200})
    await server.start()
    cfg = site(mosquitto.port, tmp_path, RTU_BUS.format(port=bridge.gateway_port))
    await server.set_raw(11, cfg.devices[0].points[0], 7)
    await server.set_raw(12, cfg.devices[1].points[0], 9)
    caplog.set_level("INFO", logger="yujing")
    try:
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await asyncio.sleep(1.5)
            healthy_before = bridge.stats.per_unit.get(12, 0)
            bridge.dead_units.add(11)
            await asyncio.sleep(3.0)
            healthy_during = bridge.stats.per_unit.get(12, 0) - healthy_before
            pollers = {p.config.name: p for p in gw.schedulers[0].pollers}
            state = pollers["gas1"].state.value
            bridge.dead_units.clear()
            await col.wait_for(lambda c: c.latest("gas1", "conc")["quality"] == "good", timeout=8)
    finally:
        await server.stop()
        bridge.close()
    assert state == "offline"
    qualities = [r["quality"] for r in col.records if r["device"] == "gas1"]
    assert "timeout" in qualities and "offline" in qualities  # bad quality while dead: never a silent gap
    # The live device kept its rate: 3 s at 4 polls/s ≈ 12 reads, allow scheduling slack.
    assert healthy_during >= 9, healthy_during
    assert bridge.stats.overlaps == 0, "two transactions on the wire at once"
    log = caplog.text
    assert "device gas1 (bus rs485, unit 11) online -> degraded" in log
    assert "degraded -> offline" in log and "offline -> online" in log


async def test_modbus_exception_and_crc_error_become_qualities(mosquitto, tmp_path: Path) -> None:
    bridge = PtyBridge(response_timeout=0.15)
    bridge.start()
    s11, s12 = SimSlave(11), SimSlave(12)
    server = SimServer([s11, s12], serial={"port": bridge.device_port, "baudrate": 19200})
    await server.start()
    s11.exception = 2
    bridge.corrupt_units.add(12)
    cfg = site(mosquitto.port, tmp_path, RTU_BUS.format(port=bridge.gateway_port))
    try:
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)):
            await col.wait_for(lambda c: c.latest("gas1", "conc") is not None
                               and any(r["device"] == "gas2" and r["quality"] == "framing" for r in c.records))
    finally:
        await server.stop()
        bridge.close()
    assert col.latest("gas1", "conc")["quality"] == "modbus_exception_02"
    assert col.latest("gas1", "conc")["value"] is None
    gas2 = [r["quality"] for r in col.records if r["device"] == "gas2"]
    # A corrupted reply is "framing" (bytes came, no valid frame); on a loaded machine a reply that comes
    # after the 0.15 s timeout counts as "timeout". Never "good".
    assert "framing" in gas2 and set(gas2) <= {"framing", "timeout"}, gas2


async def test_picky_device_gets_its_coalesced_read_split(mosquitto, tmp_path: Path, caplog) -> None:
    port = free_port()
    slave = SimSlave(1, refuse_multi=True)
    server = SimServer([slave], tcp=("127.0.0.1", port))
    await server.start()
    body = f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\n\n' \
           '[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = 0.1\n' \
           '  [[devices.points]]\n  name = "a"\n  address = 0\n  [[devices.points]]\n  name = "b"\n  address = 1\n'
    cfg = site(mosquitto.port, tmp_path, body)
    await server.set_raw(1, cfg.devices[0].points[1], 42)
    try:
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)):
            await col.wait_for(lambda c: (r := c.latest("d", "b")) is not None and r["quality"] == "good")
    finally:
        await server.stop()
    assert col.latest("d", "b")["value"] == 42
    assert "refused 2 registers at 0" in caplog.text


async def test_broker_restart_loses_nothing(private_mosquitto, tmp_path: Path) -> None:
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    body = f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\n\n' \
           '[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = 0.1\n  [[devices.points]]\n  name = "a"\n  address = 0\n'
    cfg = site(private_mosquitto.port, tmp_path, body, reconnect_s=1.0)
    await register(private_mosquitto.port, "platform")  # the platform's consumer: a persistent session
    try:
        async with running(Gateway(cfg)) as gw:
            async with collecting(private_mosquitto.port, client_id="platform") as col:
                await col.wait_for(lambda c: len(c.records) >= 5)
            private_mosquitto.stop()
            await asyncio.sleep(1.5)  # polling goes on into the spool
            private_mosquitto.start()
            async with collecting(private_mosquitto.port, client_id="platform") as col2:
                await col2.wait_for(lambda c: gw.spool.backlog() == 0 and not gw.spool.unsent() and len(c.records) > 10, timeout=15)
    finally:
        await server.stop()
    seqs = sorted({r["seq"] for r in col.records} | {r["seq"] for r in col2.records})
    assert seqs[0] == 1
    missing = set(range(1, seqs[-1] + 1)) - set(seqs)
    assert not missing, f"messages lost across the broker restart: {sorted(missing)[:10]}"


async def test_a_broker_that_comes_back_is_used_within_seconds_not_after_the_backoff(private_mosquitto, tmp_path: Path) -> None:
    """Issue 12: while the broker is down its port is probed, and the gateway reconnects when it answers.
    The backoff here is 20 s (≥ 10 s after the first failure, full jitter), so a gateway that only backed
    off could not be back within 4 s of the broker."""
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    body = f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\n\n' \
           '[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = 0.1\n  [[devices.points]]\n  name = "a"\n  address = 0\n'
    cfg = site(private_mosquitto.port, tmp_path, body, reconnect_s=20.0)
    loop = asyncio.get_running_loop()
    try:
        async with running(Gateway(cfg)) as gw:
            while gw.uplink is None or gw.uplink.acked < 3:
                await asyncio.sleep(0.05)
            private_mosquitto.stop()
            while gw.uplink.connected:
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.5)  # down long enough for the first backoff step to be chosen
            acked = gw.uplink.acked
            began = loop.time()
            private_mosquitto.start()
            while gw.uplink.acked == acked and loop.time() - began < 15:
                await asyncio.sleep(0.02)
            back_after = loop.time() - began
    finally:
        await server.stop()
    assert gw.uplink.acked > acked, "the gateway never came back"
    assert back_after < 4.0, f"first message {back_after:.1f} s after the broker came back: it waited out the backoff"


async def test_consume_command_prints_json_and_flags_a_gap(mosquitto) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "consume", "--broker", f"127.0.0.1:{mosquitto.port}", "--duration", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(1.2)
    T = 1_764_390_000_000
    prefix = "yujing/v1/GAP-01/gw9"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.publish(f"{prefix}/birth", wire.encode_birth(session=1, ts_ms=T, site="GAP-01", gateway="gw9", software="t",
                                                                  catalogue=[PointInfo("d", "p", "mm", "uint16")]), qos=1)
        for seq in (1, 2, 5, 5):
            await client.publish(f"{prefix}/data", wire.encode_data(1, seq, [Reading(0, T + seq, Decimal("1.5") * seq)]), qos=1)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    lines = [line for line in out.decode().splitlines() if line]
    import json

    recs = [json.loads(line) for line in lines]
    assert [r["seq"] for r in recs] == [1, 2, 5, 5]
    assert recs[0] == {"site": "GAP-01", "gateway": "gw9", "device": "d", "point": "p", "ts": T + 1, "value": 1.5,
                       "unit": "mm", "quality": "good", "session": 1, "seq": 1}
    errors = err.decode()
    assert "gap: seq 3..4 missing (2 messages)" in errors
    assert "duplicate: seq 5 again" in errors


async def test_shared_subscription_splits_the_stream(mosquitto) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "consume", "--broker", f"127.0.0.1:{mosquitto.port}",
            "--topic", "yujing/v1/SHARE-01/#", "--share", "platform", "--duration", "4",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    await asyncio.sleep(1.5)
    T = 1_764_390_000_000
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        for seq in range(1, 41):
            await client.publish("yujing/v1/SHARE-01/gw/data", wire.encode_data(1, seq, [Reading(0, T, seq)]), qos=1)
    outs = [await asyncio.wait_for(p.communicate(), 15) for p in procs]
    got = [{int(line.split('"seq":')[1].split(",")[0].rstrip("}")) for line in o.decode().splitlines() if line} for o, _ in outs]
    assert got[0] and got[1], "both consumers should get part of the stream"
    assert got[0].isdisjoint(got[1])
    assert got[0] | got[1] == set(range(1, 41))


def test_yujing_run_stops_cleanly_on_sigterm(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    server_code = f"""
import asyncio
from gateway.sim.devices import SimServer, SimSlave
async def main():
    s = SimServer([SimSlave(1)], tcp=("127.0.0.1", {port}))
    await s.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""
    sim = subprocess.Popen([sys.executable, "-c", server_code])
    try:
        wait_port("127.0.0.1", port)
        (tmp_path / "site.toml").write_text(f"""
[site]
id = "RUN-01"
gateway = "gw1"
[uplink]
host = "127.0.0.1"
port = {mosquitto.port}
tls = false
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {port}
[[devices]]
name = "d"
bus = "plc"
interval_s = 0.2
  [[devices.points]]
  name = "a"
  address = 0
""")
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(tmp_path / "site.toml")],
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        import time

        time.sleep(2.5)
        t0 = time.monotonic()
        gw.send_signal(signal.SIGTERM)
        _, err = gw.communicate(timeout=10)
        took = time.monotonic() - t0
    finally:
        sim.kill()
        sim.wait()
    assert gw.returncode == 0, err
    assert took < 5.0
    assert "broker 127.0.0.1:" in err and "connected (session 1)" in err
    assert "death published (clean stop, session 1)" in err

    async def retained_death() -> bytes:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe("yujing/v1/RUN-01/gw1/death", qos=1)
            async for m in client.messages:
                return bytes(m.payload)
        return b""

    death = wire.decode_death(asyncio.run(asyncio.wait_for(retained_death(), 5)))
    assert (death.session, death.reason) == (1, "clean")
