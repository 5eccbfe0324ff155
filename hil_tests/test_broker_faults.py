"""Broker faults (issue 11, the network part's last two classes): a broker restart, and a broker that answers
but refuses the gateway with a reason code. A seeded, replayable plan.

A real gateway polls a simulated Modbus TCP device and publishes to a real, persistent mosquitto; the platform's
consumer is the reference consumer (`gateway.consumer.consume`, what `yujing consume` runs) on a persistent session
that reconnects after each restart (the broker keeps what arrived for it while it was away). The plan, drawn from the seed:

1. restart: the broker is stopped for a few seconds (the gateway spools, probes, and reconnects as soon as the port
   answers), then started again;
2. refusal: the broker is restarted with `clientid_prefixes platform`, so it accepts the platform and answers the
   gateway's CONNECT with CONNACK "client identifier not valid" (MQTT 5 reason 0x85) for a few seconds; then the
   broker is restarted with its usual configuration. The gateway must say why (the reason in its log, once), keep
   polling into the spool, and back off rather than hammer the broker.

Checked as test_network_faults.py checks (docs/wire-format.md, "Gaps and duplicates", no power cut): every reading
polled arrives, no seq gap, a repeated seq byte-identical, no reading under two seqs, per-point order within a lane;
and the local output (a siren coil on a threshold of the polled device) follows every crossing within one poll
interval + 50 ms while the broker is down or refusing, and is right at the end.
Measured: per fault, the time from its end to the first new message at the consumer, CONNECT attempts during the
refusal, and latency percentiles. Report: test-artifacts/hil/broker-faults.json and the `hil_report` record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.app import Gateway
from gateway.consumer import Decoder, consume
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import Broker, free_port
from tests.e2e import register, running, site

from .report import ARTIFACTS, seed
from .test_network_faults import SIREN, SIREN_COIL, Applied, Watch, analyse, cross, outputs

pytestmark = pytest.mark.hil

POINTS = 3
INTERVAL_S = 0.2


def broker_plan(seed_: int) -> dict[str, float]:
    rng = random.Random(f"broker-faults-{seed_}")
    return {"restart_down_s": round(rng.uniform(2.0, 5.0), 2), "refusal_s": round(rng.uniform(3.0, 6.0), 2)}


class Watching(Decoder):
    """The reference decoder, with every message also stamped into the Watch on arrival."""

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch

    def feed(self, topic: str, payload: bytes) -> Any:
        self.watch.feed(topic, payload)
        return super().feed(topic, payload)


async def platform(port: int, watch: Watch) -> None:
    """The platform: the reference consumer (gateway.consumer.consume, what `yujing consume` runs) on a persistent
    session that comes back after every broker restart."""
    await consume(lambda: aiomqtt.Client("127.0.0.1", port, identifier="platform", clean_session=False),
                  ["yujing/v1/#"], Watching(watch), lambda rec: None, lambda n: None, backoff_min_s=0.1, backoff_max_s=0.2)


def restart(broker: Broker, extra: str = "") -> None:
    """Restart the broker with its own configuration plus `extra` lines (persistence keeps the sessions)."""
    base = broker.conf.read_text().split("# fault\n")[0]
    broker.conf.write_text(base + ("# fault\n" + extra if extra else ""))
    broker.start()


async def wait_new(watch: Watch, after: float, timeout: float = 20.0) -> float | None:
    deadline = time.monotonic() + timeout
    while (got := watch.first_new_after(after)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return None if got is None else round(got - after, 3)


@pytest.mark.needs("simulated_devices", "broker_control")
async def test_broker_restart_and_refusal_lose_nothing(private_mosquitto: Broker, tmp_path: Path, hil_report,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    s = seed()
    plan = broker_plan(s)
    hil_report.seed = s
    print(f"\nYUJING_HIL_SEED={s} plan={plan}")
    caplog.set_level(logging.INFO, logger="gateway")
    modbus = free_port()
    server = SimServer([SimSlave(1, clock=time.monotonic)], tcp=("127.0.0.1", modbus))
    await server.start()
    body = (f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {modbus}\n\n'
            f'[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = {INTERVAL_S}\n'
            + "".join(f'  [[devices.points]]\n  name = "p{i}"\n  address = {i}\n' for i in range(POINTS)) + SIREN)
    flips: list[tuple[float, bool]] = []
    cfg = site(private_mosquitto.port, tmp_path, body, reconnect_s=0.2)
    watch = Watch()
    polled: set[tuple[int, int]] = set()
    applied: list[Applied] = []
    wanted: set[tuple[int, int]] = set()
    mono0, wall0_ms = time.monotonic(), time.time_ns() // 1_000_000
    attempts_refused = 0
    connects = 0
    await register(private_mosquitto.port, "platform")  # its session exists before the first reading is published
    try:
        gw = Gateway(cfg)
        sink = gw._sink

        def counting(readings: list[Any]) -> None:
            polled.update((r.point, r.ts_ms) for r in readings)
            sink(readings)

        gw._sink = counting  # type: ignore[method-assign]
        consumer = asyncio.create_task(platform(private_mosquitto.port, watch))
        async with running(gw):
            link = asyncio.create_task(watch.watch_link(gw))
            try:
                while len(watch.delivered) < 5 * POINTS:
                    await asyncio.sleep(0.05)
                gauge = asyncio.create_task(cross(server, cfg.devices[0].points[0], s, flips, (0.8, 1.6)))

                began = time.monotonic()
                private_mosquitto.stop()
                hil_report.fault("broker.restart", began - mono0, down_s=plan["restart_down_s"])
                await asyncio.sleep(plan["restart_down_s"])
                restart(private_mosquitto)
                a = Applied("restart", {"down_s": plan["restart_down_s"]}, began, time.monotonic())
                a.recovery_s = await wait_new(watch, a.ended)
                applied.append(a)
                await asyncio.sleep(1.0)

                began = time.monotonic()
                before = gw.uplink.connects
                refused_logs = len([r for r in caplog.records if "not authorized" in r.getMessage().lower()])
                restart(private_mosquitto, "clientid_prefixes platform\n")
                hil_report.fault("broker.refuse", began - mono0, reason="CONNACK Not authorized (0x87)",
                                 seconds=plan["refusal_s"])
                await asyncio.sleep(plan["refusal_s"])
                connected_while_refused = gw.uplink.connects - before
                attempts_refused = len([r for r in caplog.records if "not authorized" in r.getMessage().lower()]) - refused_logs
                restart(private_mosquitto)
                a = Applied("refusal", {"seconds": plan["refusal_s"]}, began, time.monotonic())
                a.recovery_s = await wait_new(watch, a.ended)
                applied.append(a)

                gauge.cancel()
                await asyncio.sleep(INTERVAL_S + 0.3)  # the last crossing's output
                wanted = set(polled)
                deadline = time.monotonic() + 25
                while not wanted <= watch.delivered and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                connects = gw.uplink.connects
            finally:
                link.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        siren_on = await server.coil(1, SIREN_COIL)
        await server.stop()
    figures = analyse(watch, wanted or set(polled), applied, wall0_ms, mono0)
    figures["outputs"] = outputs(flips, server.slaves[1].coil_writes, siren_on, applied)
    said = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    report = {
        "seed": s, "plan": plan,
        "applied": [{"fault": f.fault, **f.params, "began_s": round(f.began - mono0, 3), "ended_s": round(f.ended - mono0, 3),
                     "recovery_s": f.recovery_s} for f in applied],
        "connects": connects, "said_while_down": said[:10], "figures": figures,
        "lost_between_s": [round((min(t for _, t in lost) - wall0_ms) / 1000, 3), round((max(t for _, t in lost) - wall0_ms) / 1000, 3)]
        if (lost := (wanted or polled) - watch.delivered) else None,
        "arrivals": [{"t": round(a.mono - mono0, 3), "kind": a.kind, "seq": a.seq, "session": a.session,
                      "readings": len(a.readings), "new": a.new} for a in watch.arrivals],
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "broker-faults.json").write_text(json.dumps(report, indent=2))
    for f in applied:
        hil_report.figures[f"recovery_s.{f.fault}"] = f.recovery_s
    hil_report.figures.update(lost=figures["lost"], duplicates=figures["duplicate_seqs"], polled=figures["readings_polled"],
                              latency_s=figures["latency_s"].get("all"), connects=connects)
    print(f"broker faults, seed {s}: " + ", ".join(f"{f.fault} back after {f.recovery_s} s" for f in applied)
          + f"; polled {figures['readings_polled']}, lost {figures['lost']}, repeated seqs {figures['duplicate_seqs']}, "
          f"connects {connects}; siren {figures['outputs']}; said while refused: {said[-1] if said else '-'}")

    assert [f.recovery_s is not None for f in applied] == [True, True], f"no new message after a fault: {report['applied']}"
    assert connected_while_refused == 0, "the broker refused the gateway, yet it counted a connection"
    refusals = [m for m in said if "[code:135] Not authorized" in m]
    assert refusals, f"the refusal's reason code was never said: {said}"
    assert "ACL" in refusals[0], f"no hint of what to check: {refusals[0]}"
    assert attempts_refused <= 2, f"the same refusal was logged {attempts_refused} times at INFO or above"
    assert figures["lost"] == 0, f"{figures['lost']} readings lost, e.g. {figures['lost_sample']}"
    assert not figures["seq_gaps"], f"seqs never delivered: {figures['seq_gaps']}"
    assert not figures["duplicate_seqs_not_identical"], "a repeated seq with different bytes"
    assert figures["readings_under_two_seqs"] == 0
    assert figures["out_of_order_count"] == 0, figures["out_of_order"]
    out = figures["outputs"]
    assert out["crossings"] >= 3 and out["during_faults"] >= 2, out
    assert not out["missed"], f"the siren never followed these crossings: {out['missed']}"
    assert out["latency_s"]["max"] <= INTERVAL_S + 0.05, f"the siren followed a crossing late: {out}"
    assert out["final_right"], f"the siren is in the wrong state at the end: {out}"


def test_the_broker_plan_is_a_function_of_the_seed() -> None:
    assert broker_plan(7) == broker_plan(7)
    assert broker_plan(7) != broker_plan(8)
