"""Local alarms end to end: real pymodbus detector, real mosquitto (stopped and restarted), the gateway's
alarm desk, spooled alarm events, retained state, signed MQTT acknowledgements and the local socket."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiomqtt
import pycddl

from gateway import commands, wire
from gateway.alarms import control_request
from gateway.app import Gateway
from gateway.rules import Level
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

from .e2e import collecting, register, running, site

ROOT = Path(__file__).parent.parent
SCHEMA = pycddl.Schema((ROOT / "docs" / "wire-format.cddl").read_text())

GAS = """
[[buses]]
name = "plc"
type = "tcp"
host = "127.0.0.1"
port = {port}

[[devices]]
name = "lel1"
bus = "plc"
unit = 1
interval_s = 0.2
  [[devices.points]]
  name = "conc"
  address = 0
  scale = 0.1
  unit = "%LEL"

[[rules]]
kind = "threshold"
id = "gas.lel1"
point = "lel1.conc"
direction = "high"
latch = true
levels = [ {{ level = "III_YELLOW", set = 25, clear = 23 }}, {{ level = "II_ORANGE", set = 50, clear = 48 }} ]
"""


async def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _gas_site(broker_port: int, tmp_path: Path, modbus_port: int):  # type: ignore[no-untyped-def]
    if not (tmp_path / "platform.key").exists():
        commands.new_key_pair(tmp_path / "platform.key")  # the platform's pair; the gateway gets the public half
    return site(broker_port, tmp_path, GAS.format(port=modbus_port), uplink_extra='command_public_key_file = "platform.key.pub"', reconnect_s=1.0)


async def test_gas_ramp_with_broker_down_then_events_in_order_and_signed_ack(private_mosquitto, tmp_path: Path) -> None:
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    cfg = _gas_site(private_mosquitto.port, tmp_path, port)
    point = cfg.devices[0].points[0]
    await server.set_point(1, point, 10)
    await register(private_mosquitto.port, "platform")  # the platform's consumer, as in production
    private_mosquitto.stop()
    try:
        async with running(Gateway(cfg)) as gw:
            await _until(lambda: gw.desk is not None and gw.readings > 0)
            for value in (18, 26, 38, 52.5, 20):  # up through yellow and orange, then back down
                await server.set_point(1, point, value)
                await asyncio.sleep(0.5)
            engine = gw.desk.engine
            state = engine.snapshot()["gas.lel1"]
            assert (state.level, state.latched) == (Level.II_ORANGE, True), state  # latched: gas alarms need an ack
            assert gw.spool.events_waiting >= 2  # held while the broker is down
            private_mosquitto.start()
            async with collecting(private_mosquitto.port, client_id="platform") as col:
                await col.wait_for(lambda c: len([r for r in c.records if "alarm" in r]) >= 2, timeout=15)
                # the retained state follows the latch (the condition fell, the level held) within a tick
                await col.wait_for(lambda c: any(t.endswith("/alarms") and wire.decode_alarms(p)[2][0].latched for t, p in c.payloads))
                events = [r for r in col.records if "alarm" in r]
                assert [(e["alarm"], e["level"]) for e in events[:2]] == [("raised", "III_YELLOW"), ("escalated", "II_ORANGE")]
                assert events[1]["values"] == {"lel1.conc": 52.5}
                _, _, states = wire.decode_alarms([p for t, p in col.payloads if t.endswith("/alarms")][-1])
                assert [(a.rule, a.level, a.latched) for a in states] == [("gas.lel1", 3, True)]

                prefix = "yujing/v1/TEST-01/gw1"
                replies: list[wire.Reply] = []
                platform = commands.load_private_key(tmp_path / "platform.key")
                commands.new_key_pair(tmp_path / "mallory.key")
                mallory = commands.load_private_key(tmp_path / "mallory.key")
                async with aiomqtt.Client("127.0.0.1", private_mosquitto.port) as client:
                    await client.subscribe(f"{prefix}/reply", qos=1)

                    async def command(payload: bytes) -> wire.Reply:
                        await client.publish(f"{prefix}/cmd", payload, qos=1)
                        async with asyncio.timeout(5):
                            async for m in client.messages:
                                reply = wire.decode_reply(bytes(m.payload))
                                assert reply.digest == commands.digest(payload)  # a reply names what it answers
                                return reply
                        raise AssertionError("no reply")

                    def ack(key, rule: str, rid: str, **kw):  # type: ignore[no-untyped-def]
                        return commands.sign_command(key, site="TEST-01", gateway="gw1", command="ack", rule=rule, by="li",
                                                     request_id=rid, **kw)

                    now = gw.clock.time_ms()
                    replies.append(await command(b"\xa1\x00"))  # malformed
                    replies.append(await command(ack(mallory, "gas.lel1", "r1")))  # a key the gateway does not know
                    replies.append(await command(ack(platform, "gas.nope", "r2")))
                    replies.append(await command(ack(platform, "gas.lel1", "r3", ts_ms=now - 3_600_000)))
                    other = commands.sign_command(platform, site="TEST-01", gateway="gw2", command="ack", rule="gas.lel1",
                                                  by="li", request_id="r5")
                    replies.append(await command(other))  # signed for another gateway
                    assert engine.snapshot()["gas.lel1"].level == Level.II_ORANGE  # nothing rejected changed anything
                    good = ack(platform, "gas.lel1", "r4")
                    replies.append(await command(good))
                    replies.append(await command(good))  # captured and replayed
                await col.wait_for(lambda c: any(r.get("alarm") == "cleared" for r in c.records))
    finally:
        await server.stop()
    assert not replies[0].ok and replies[0].request_id is None and "rejected (shape)" in replies[0].message
    assert not replies[1].ok and replies[1].request_id is None and "unauthorised" in replies[1].message
    assert replies[2].request_id == "r2" and not replies[2].ok and "no alarm rule 'gas.nope'" in replies[2].message
    assert replies[3].request_id == "r3" and not replies[3].ok and "stale or future timestamp" in replies[3].message
    assert not replies[4].ok and "rejected (target)" in replies[4].message
    assert replies[5].request_id == "r4" and replies[5].ok and "acknowledged by li" in replies[5].message
    assert replies[6].request_id == "r4" and not replies[6].ok and "replayed" in replies[6].message
    kinds = [r["alarm"] for r in col.records if "alarm" in r]
    assert kinds[:2] == ["raised", "escalated"] and kinds[-2:] == ["acknowledged", "cleared"]
    alarm_seqs = [r["seq"] for r in col.records if "alarm" in r]
    assert alarm_seqs == sorted(alarm_seqs)
    for topic, payload in col.payloads:
        if not topic.endswith("/cmd"):
            SCHEMA.validate_cbor(payload)


async def test_latch_survives_restart_and_local_ack_clears_it(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    cfg = _gas_site(mosquitto.port, tmp_path, port)
    point = cfg.devices[0].points[0]
    try:
        await server.set_point(1, point, 60)
        async with running(Gateway(cfg)) as gw:
            await _until(lambda: gw.desk is not None and gw.desk.engine.level("gas.lel1") == Level.II_ORANGE)
        await server.set_point(1, point, 3)  # the gas is gone while the gateway is down
        async with running(Gateway(cfg)) as gw:
            await _until(lambda: gw.desk is not None and gw.readings > 3)
            await asyncio.sleep(0.5)
            assert gw.desk.engine.snapshot()["gas.lel1"].level == Level.II_ORANGE  # still latched after restart
            sock = cfg.state_dir / "control.sock"
            assert oct(sock.stat().st_mode & 0o777) == "0o600"
            bad = await control_request(sock, {"ack": "gas.nope", "by": "li"})
            assert not bad["ok"] and "no alarm rule 'gas.nope'" in bad["message"]
            ok = await control_request(sock, {"ack": "gas.lel1", "by": "li"})
            assert ok["ok"], ok
            await _until(lambda: gw.desk.engine.level("gas.lel1") == Level.NONE)
    finally:
        await server.stop()


async def test_a_faulty_sensor_raises_a_fault_not_zero_gas(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    slave = SimSlave(1)
    server = SimServer([slave], tcp=("127.0.0.1", port))
    await server.start()
    cfg = _gas_site(mosquitto.port, tmp_path, port)
    point = cfg.devices[0].points[0]
    try:
        await server.set_point(1, point, 30)
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await _until(lambda: gw.desk is not None and gw.desk.engine.level("gas.lel1") == Level.III_YELLOW)
            slave.exception = 4  # the detector reports a device failure
            await _until(lambda: gw.desk.engine.snapshot()["gas.lel1"].fault)
            state = gw.desk.engine.snapshot()["gas.lel1"]
            await col.wait_for(lambda c: any(r.get("alarm") == "fault" for r in c.records))
    finally:
        await server.stop()
    assert state.level == Level.III_YELLOW  # a fault never clears the alarm
    assert not any(r.get("alarm") == "cleared" for r in col.records)
    bad = [r for r in col.records if r.get("point") == "conc" and r["quality"] != "good"]
    assert bad and all(r["value"] is None for r in bad)  # no value, never 0 %LEL


SIREN = """
[[buses]]
name = "rs485"
type = "rtu"
port = "{tty}"
baudrate = 19200
timeout_s = 0.2
pause_s = 0.005

[[devices]]
name = "lel1"
bus = "rs485"
unit = 11
interval_s = 0.5
  [[devices.points]]
  name = "conc"
  address = 1
  scale = 0.1
  unit = "%LEL"

[[rules]]
kind = "threshold"
id = "gas.lel1"
point = "lel1.conc"
latch = true
levels = [ {{ level = "III_YELLOW", set = 25, clear = 23 }}, {{ level = "II_ORANGE", set = 50, clear = 48 }} ]

[[actions]]
kind = "coil"
name = "area.siren"
when = {{ rules = ["gas.*"], level = "II_ORANGE" }}
bus = "rs485"
unit = 30
address = 0

[[actions]]
kind = "coil"
name = "area.beacon"
when = {{ rules = ["gas.*"], level = "III_YELLOW" }}
bus = "rs485"
unit = 30
address = 1
"""


async def test_gas_ramp_switches_the_siren_within_one_poll_with_the_broker_down(private_mosquitto, tmp_path: Path) -> None:
    import time

    from gateway.sim.ptybridge import PtyBridge

    bridge = PtyBridge(response_timeout=0.2)
    bridge.start()
    detector, relay = SimSlave(11), SimSlave(30, clock=time.monotonic)
    server = SimServer([detector, relay], serial={"port": bridge.device_port, "baudrate": 19200})
    await server.start()
    cfg = site(private_mosquitto.port, tmp_path, SIREN.format(tty=bridge.gateway_port), reconnect_s=1.0)
    point = cfg.devices[0].points[0]
    interval = cfg.devices[0].interval_s
    await server.set_point(11, point, 5)
    await register(private_mosquitto.port, "platform")  # the platform's consumer, as in production
    private_mosquitto.stop()
    latencies = {}
    try:
        async with running(Gateway(cfg)) as gw:
            await _until(lambda: gw.readings >= 2)
            assert not await server.coil(30, 0) and not await server.coil(30, 1)
            for value, address in ((30, 1), (55, 0)):  # 25 %LEL → beacon (yellow), 50 %LEL → siren (orange)
                changed = time.monotonic()
                await server.set_point(11, point, value)
                await _until(lambda a=address: any(w[0] == a and w[1] for w in relay.coil_writes), timeout=5)
                written = next(w[2] for w in relay.coil_writes if w[0] == address and w[1])
                latencies[address] = written - changed
            assert await server.coil(30, 0) and await server.coil(30, 1)
            await server.set_point(11, point, 0)  # the gas clears, but the alarm is latched: the siren stays on
            await asyncio.sleep(3 * interval)
            assert await server.coil(30, 0)
            assert gw.spool.events_waiting >= 2  # raised, escalated: waiting for the broker
            private_mosquitto.start()
            async with collecting(private_mosquitto.port, client_id="platform") as col:
                await col.wait_for(lambda c: len([r for r in c.records if "alarm" in r]) >= 2, timeout=15)
            assert bridge.stats.overlaps == 0  # the writes shared the bus with the polls without colliding
    finally:
        await server.stop()
        bridge.close()
    assert latencies[1] <= interval + 0.3, latencies  # within one poll of the register change (plus the write)
    assert latencies[0] <= interval + 0.3, latencies
    events = [(r["alarm"], r["level"]) for r in col.records if "alarm" in r]
    assert events[:2] == [("raised", "III_YELLOW"), ("escalated", "II_ORANGE")]


async def test_an_absent_relay_module_is_an_actuator_fault_and_polling_goes_on(mosquitto, tmp_path: Path) -> None:
    from gateway.sim.ptybridge import PtyBridge

    bridge = PtyBridge(response_timeout=0.2)
    bridge.start()
    server = SimServer([SimSlave(11), SimSlave(30)], serial={"port": bridge.device_port, "baudrate": 19200})
    await server.start()
    bridge.dead_units.add(30)  # the relay module does not answer
    cfg = site(mosquitto.port, tmp_path, SIREN.format(tty=bridge.gateway_port))
    point = cfg.devices[0].points[0]
    await server.set_point(11, point, 60)
    try:
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await col.wait_for(lambda c: any(r.get("alarm") == "actuator_fault" for r in c.records), timeout=10)
            polls_then = gw.readings
            await asyncio.sleep(2.0)
            assert gw.readings >= polls_then + 3  # the dead relay module does not stop the gas polls
            assert gw.desk.engine.level("gas.lel1") == Level.II_ORANGE
            bridge.dead_units.clear()  # the module is back: the siren goes on, the fault clears
            await col.wait_for(lambda c: any(r.get("alarm") == "actuator_ok" and r["rule"] == "area.siren" for r in c.records), timeout=15)
            assert await server.coil(30, 0)
    finally:
        await server.stop()
        bridge.close()
    fault = next(r for r in col.records if r.get("alarm") == "actuator_fault")
    assert fault["rule"] in ("area.siren", "area.beacon") and "30" in fault["message"]


async def test_a_bus_with_only_a_relay_module_serves_its_outputs(mosquitto, tmp_path: Path) -> None:
    port, relay_port = free_port(), free_port()
    detector = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    relay = SimServer([SimSlave(30)], tcp=("127.0.0.1", relay_port))
    await detector.start()
    await relay.start()
    body = GAS.format(port=port) + f"""
[[buses]]
name = "relays"
type = "tcp"
host = "127.0.0.1"
port = {relay_port}

[[actions]]
kind = "coil"
name = "siren"
when = {{ rules = ["gas.*"], level = "II_ORANGE" }}
bus = "relays"
unit = 30
address = 0
"""
    cfg = site(mosquitto.port, tmp_path, body)
    try:
        await detector.set_point(1, cfg.devices[0].points[0], 70)
        async with running(Gateway(cfg)) as gw:
            await _until(lambda: gw.desk is not None and gw.desk.engine.level("gas.lel1") == Level.II_ORANGE)
            for _ in range(100):
                if await relay.coil(30, 0):
                    break
                await asyncio.sleep(0.05)
            assert await relay.coil(30, 0)
    finally:
        await detector.stop()
        await relay.stop()
