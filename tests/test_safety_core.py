"""Nothing silences an alarm: hostile commands, a broken stage of any kind, and a detector fault reported in
the same poll as a reading. Each test breaks something and then measures register change → siren coil
against one poll interval, on the real gateway with a real pymodbus detector and relay and a real mosquitto.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiomqtt
import cbor2
import pytest

from gateway.alarms import ControlServer, control_request
from gateway.app import Gateway
from gateway.command_inbox import CommandInbox
from gateway.rules import Level
from gateway.spool import Spool
from gateway.uplink.mqtt import Uplink

from .e2e import collecting, running
from .rig import INTERVAL_S, SLACK_S, gas_config, gas_rig, until

CMD = "yujing/v1/TEST-01/gw1/cmd"

# Each of these stopped the gateway on the old command path (a non-WireError raised while the *error
# message* was being built, before any signature check); published retained, within 0.3 s of every start.
HOSTILE = {
    "bignum request id": cbor2.dumps({0: 1, 23: 10**5000}),
    "unknown keys of mixed type": cbor2.dumps({0: 1, "x": 1, 99: 2}),
    "bignum version": cbor2.dumps({0: 10**5000}),
}


async def _publish(port: int, payload: bytes, *, retain: bool = False) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.publish(CMD, payload, qos=1, retain=retain)


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_a_hostile_retained_command_does_not_stop_the_gateway(private_mosquitto, tmp_path: Path, name: str) -> None:
    # MQTT 3.1.1: the broker delivers retained messages on subscribe (MQTT 5 is asked not to), so the
    # gateway's own checks are what is tested here.
    await _publish(private_mosquitto.port, HOSTILE[name], retain=True)
    async with gas_rig() as rig:
        cfg = gas_config(private_mosquitto.port, tmp_path, rig.port, uplink_extra='protocol = "3.1.1"')
        await rig.gas(cfg, 5)
        for restart in range(2):  # the retained message greets every start
            async with running(Gateway(cfg)) as gw:
                await until(lambda: gw.uplink is not None and gw.uplink.connected, what="uplink connected")
                await until(lambda: gw.inbox is not None and sum(gw.inbox.stats.rejected.values()) >= 1, what="command rejected")
                readings = gw.readings
                await asyncio.sleep(3 * INTERVAL_S)
                assert gw.readings > readings  # still polling
                if restart == 0:
                    latency = await rig.siren_latency(cfg)
                    assert latency <= INTERVAL_S + SLACK_S, latency
                assert gw.inbox.stats.rejected == {"retained": 1}
                assert gw.inbox.stats.accepted == 0


async def test_mqtt5_asks_the_broker_not_to_send_retained_commands(private_mosquitto, tmp_path: Path) -> None:
    await _publish(private_mosquitto.port, HOSTILE["bignum request id"], retain=True)
    async with gas_rig() as rig:
        cfg = gas_config(private_mosquitto.port, tmp_path, rig.port)  # protocol "5", the default
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.uplink is not None and gw.uplink.connected, what="uplink connected")
            await asyncio.sleep(1.0)
            assert gw.inbox is not None and gw.inbox.stats.rejected == {} and gw.readings > 0


async def test_a_half_megabyte_bignum_decimal_does_not_delay_the_siren(private_mosquitto, tmp_path: Path) -> None:
    # Old path: cbor2 decoded this on the event loop, quadratically (the siren came on 44.7 s late).
    mantissa = int.from_bytes(os.urandom(512 * 1024), "big") | 1
    hostile = cbor2.dumps({0: 1, 20: "ack", 23: cbor2.CBORTag(4, [-2, mantissa])})
    assert len(hostile) > 512 * 1024
    async with gas_rig() as rig:
        cfg = gas_config(private_mosquitto.port, tmp_path, rig.port, uplink_extra='protocol = "3.1.1"')
        await rig.gas(cfg, 5)
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.uplink is not None and gw.uplink.connected, what="uplink connected")
            for _ in range(3):
                await _publish(private_mosquitto.port, hostile)
            latency = await rig.siren_latency(cfg)
            await until(lambda: sum(gw.inbox.stats.rejected.values()) == 3, what="three rejections")
    assert latency <= INTERVAL_S + SLACK_S, latency
    assert gw.inbox.stats.rejected == {"size": 3}


@pytest.mark.parametrize("status_first", [False, True], ids=["status-after-value", "status-before-value"])
@pytest.mark.parametrize("how", ["rule-flags", "point-validity"])
async def test_a_detector_fault_with_zero_never_clears_the_alarm(mosquitto, tmp_path: Path, status_first: bool, how: str) -> None:
    """The chemical-park detector: real gas at 37 %LEL, then 0 together with its fault bit in one poll."""
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port, status_first=status_first,
                         rule_flags=how == "rule-flags", point_validity=how == "point-validity")
        await rig.gas(cfg, 37)
        async with collecting(mosquitto.port) as col, running(Gateway(cfg)) as gw:
            await until(lambda: gw.desk is not None and gw.desk.engine.level("gas.lel1") == Level.III_YELLOW, what="yellow")
            await until(lambda: any(w[0] == 1 and w[1] for w in rig.relay.coil_writes), what="beacon on")
            beacon_on = len(rig.relay.coil_writes)
            # Both registers change in one write, so one poll sees 0 %LEL and the fault bit together.
            await rig.server.server.async_setValues(1, 16, 0, [0, 1])
            await until(lambda: gw.desk.engine.snapshot()["gas.lel1"].fault, what="fault")
            await asyncio.sleep(4 * INTERVAL_S)
            state = gw.desk.engine.snapshot()["gas.lel1"]
            await col.wait_for(lambda c: any(r.get("alarm") == "fault" for r in c.records))
    assert state.level == Level.III_YELLOW and state.fault
    kinds = [r["alarm"] for r in col.records if "alarm" in r]
    assert "cleared" not in kinds and kinds[:2] == ["raised", "fault"], kinds
    assert not any(w[0] == 1 and not w[1] for w in rig.relay.coil_writes[beacon_on:])  # the beacon never went dark
    faulted = [r for r in col.records if r.get("point") == "conc" and r["quality"] != "good"]
    if how == "point-validity":  # the reading itself says so on the wire: no value, quality device_fault
        assert faulted and all(r["quality"] == "device_fault" and r["value"] is None for r in faulted)
        assert not any(r.get("point") == "conc" and r["value"] == 0 and r["quality"] == "good" for r in col.records)


# ---------------------------------------------------------------------------------------------- stages


async def _raise(*_args, **_kwargs):  # type: ignore[no-untyped-def]
    raise RuntimeError("injected failure")


async def _hang(*_args, **_kwargs):  # type: ignore[no-untyped-def]
    await asyncio.Event().wait()


def _raise_sync(*_args, **_kwargs):  # type: ignore[no-untyped-def]
    raise RuntimeError("injected failure")


def _stall_sync(*_args, **_kwargs):  # type: ignore[no-untyped-def]
    time.sleep(6)  # a disk that stops answering (the storage thread is stuck; nothing else must be)


INJECTIONS = {
    "uplink-raises": (Uplink, "run", _raise, "stage.uplink"),
    "uplink-hangs": (Uplink, "run", _hang, None),
    "storage-raises": (Spool, "store", _raise_sync, "storage"),
    "storage-hangs": (Spool, "store", _stall_sync, None),
    "commands-raise": (CommandInbox, "handle", _raise, "stage.commands"),
    "commands-hang": (CommandInbox, "handle", _hang, "stage.commands"),
    "control-raises": (ControlServer, "_answer", _raise_sync, None),
    "control-hangs": (ControlServer, "start", _hang, None),
}


@pytest.mark.parametrize("name", list(INJECTIONS))
async def test_a_failing_or_hanging_stage_never_delays_the_siren(mosquitto, tmp_path: Path, monkeypatch, name: str) -> None:
    cls, attr, replacement, fault = INJECTIONS[name]
    monkeypatch.setattr(cls, attr, replacement)
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port)
        await rig.gas(cfg, 5)
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.readings >= 2, what="first polls")
            if name.startswith("commands"):
                await until(lambda: gw.uplink.connected, what="uplink connected")
                async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
                    await client.publish(CMD, b"\xa0", qos=1)
            if name == "control-raises":
                await until(lambda: (cfg.state_dir / "control.sock").exists(), what="control socket")
                reply = await control_request(cfg.state_dir / "control.sock", {"status": True})
                assert reply == {"ok": False, "message": "internal error: RuntimeError"}
            latency = await rig.siren_latency(cfg)
            readings = gw.readings
            await asyncio.sleep(3 * INTERVAL_S)
            assert gw.readings > readings, "polling stopped"
            if fault is not None:
                await until(lambda: fault in gw.health.faults, timeout=15, what=f"gateway fault {fault}")
            assert gw.desk.engine.level("gas.lel1") == Level.II_ORANGE
    assert latency <= INTERVAL_S + SLACK_S, latency


async def test_a_hanging_program_action_never_delays_the_siren(mosquitto, tmp_path: Path) -> None:
    extra = """
[[actions]]
kind = "program"
name = "notify.stuck"
when = { rules = ["gas.*"] }
command = ["sleep", "600"]
"""
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port, extra=extra)
        await rig.gas(cfg, 30)  # yellow: the program starts and never ends
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.outputs is not None and gw.outputs.status()["notify.stuck"]["attempts"] >= 1, what="program started")
            latency = await rig.siren_latency(cfg)
    assert latency <= INTERVAL_S + SLACK_S, latency


async def test_a_gateway_fault_is_an_alarm_event_and_drives_only_a_fault_lamp(mosquitto, tmp_path: Path, monkeypatch) -> None:
    extra = """
[[actions]]
kind = "coil"
name = "fault.lamp"
when = { rules = ["gateway.fault"], level = "IV_BLUE" }
bus = "plc"
unit = 30
address = 2
"""
    monkeypatch.setattr(Spool, "store", _raise_sync)
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port, extra=extra)
        await rig.gas(cfg, 5)
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.health is not None and "storage" in gw.health.faults, what="storage fault")
            await until(lambda: any(w[0] == 2 and w[1] for w in rig.relay.coil_writes), what="fault lamp on")
            monkeypatch.undo()  # the disk works again: the held readings and events are written, the fault clears
            async with collecting(mosquitto.port) as col:
                await col.wait_for(lambda c: any(r.get("alarm") == "gateway_ok" for r in c.records), timeout=15)
            await until(lambda: any(w[0] == 2 and not w[1] for w in rig.relay.coil_writes), what="fault lamp off")
    assert not any(w[0] == 0 and w[1] for w in rig.relay.coil_writes)  # the siren (gas.*) ignored the gateway fault
    events = [r for r in col.records if "alarm" in r]
    fault = next(e for e in events if e["alarm"] == "gateway_fault")
    assert fault["rule"] == "gateway.storage" and "RuntimeError" in fault["message"]


async def test_the_control_socket_refuses_a_forged_or_unbounded_name(mosquitto, tmp_path: Path) -> None:
    async with gas_rig() as rig:
        cfg = gas_config(mosquitto.port, tmp_path, rig.port)
        await rig.gas(cfg, 60)
        async with running(Gateway(cfg)) as gw:
            sock = cfg.state_dir / "control.sock"
            await until(lambda: sock.exists() and gw.desk is not None and gw.desk.engine.level("gas.lel1") == Level.II_ORANGE)
            forged = await control_request(sock, {"ack": "gas.lel1", "by": "li\n2026-12-02 WARNING yujing.alarms: all clear"})
            huge = await control_request(sock, {"ack": "gas.lel1", "by": "x" * 100})
            over = await control_request(sock, {"ack": "gas.lel1", "by": "x" * 5000})  # past the request line limit
            assert gw.desk.engine.level("gas.lel1") == Level.II_ORANGE
            good = await control_request(sock, {"ack": "gas.lel1", "by": "li"})
    assert not forged["ok"] and "printable" in forged["message"] and "\n" not in forged["message"]
    assert not huge["ok"] and len(huge["message"]) < 200
    assert not over["ok"] and "bad request" in over["message"]
    assert good["ok"]
