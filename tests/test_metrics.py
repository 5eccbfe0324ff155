"""Prometheus metrics (gateway.metrics) scraped from a real gateway: a pymodbus device, mosquitto, the
alarm desk, a coil output and the command inbox; then a broker outage; then a family that breaks."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__, commands
from gateway.app import Gateway
from gateway.clock import SystemClock
from gateway.commands import REJECT_REASONS
from gateway.histogram import Histogram
from gateway.metrics import FAMILIES, PROCESS_FAMILIES, Metrics
from gateway.rules import Level
from gateway.sim.devices import SimServer, SimSlave
from tests.conftest import free_port

from .e2e import running, site

ROOT = Path(__file__).parent.parent

SITE = """
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
levels = [ {{ level = "III_YELLOW", set = 25, clear = 23 }} ]

[[actions]]
kind = "coil"
name = "siren"
when = {{ rules = ["gas.*"], level = "III_YELLOW" }}
bus = "plc"
unit = 1
address = 0
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def scraped_name(kind: str, name: str) -> str:
    return name + "_count" if kind == "histogram" else name


async def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached in time")
        await asyncio.sleep(0.05)


async def test_a_running_gateway_serves_every_metric_and_they_follow_polls_alarms_and_commands(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    commands.new_key_pair(tmp_path / "platform.key")  # the gateway holds the public half: commands are checked
    cfg = site(mosquitto.port, tmp_path, SITE.format(port=port), uplink_extra='command_public_key_file = "platform.key.pub"')
    point = cfg.devices[0].points[0]
    await server.set_point(1, point, 10)
    try:
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.uplink is not None and gw.uplink.connected and gw.readings > 0, what="first readings")
            metrics = Metrics(gw)
            body, content_type = metrics.render()  # on the event loop: never waits for the storage thread
            assert content_type.startswith("text/plain")
            first = parse(body)
            poller = gw.schedulers[0].pollers[0]
            polls = poller.polls
            await until(lambda: poller.polls >= polls + 3, what="three more polls")

            await server.set_point(1, point, 30)  # over the yellow threshold: the rule, then the siren
            await until(lambda: gw.desk.engine.level("gas.lel1") == Level.III_YELLOW, what="yellow")
            await until(lambda: gw.outputs.status()["siren"]["applied"] is True, what="the siren on")

            prefix = "yujing/v1/TEST-01/gw1"
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
                await client.subscribe(f"{prefix}/reply", qos=1)
                await client.publish(f"{prefix}/cmd", b"\xa1\x00", qos=1)  # not a COSE_Sign1: rejected (shape)
                async with asyncio.timeout(5):
                    async for _ in client.messages:
                        break
            await until(lambda: gw.uplink.acked > 0, what="a PUBACK")

            second = parse((await metrics.render_async())[0])
            third = parse((await asyncio.to_thread(metrics.render))[0])  # from a thread: waits for the spool's figures
    finally:
        await server.stop()

    for scrape in (second, third):
        missing = [f.name for f in FAMILIES if scraped_name(f.kind, f.name) not in names(scrape)]
        assert not missing, missing
        assert set(PROCESS_FAMILIES) <= names(scrape)
    assert value(third, "process_resident_memory_bytes") > 1_000_000

    dev = {"bus": "plc", "device": "lel1"}
    assert value(second, "yujing_polls_total", **dev) >= value(first, "yujing_polls_total", **dev) + 3
    assert value(second, "yujing_readings_total", **dev, quality="good") >= value(first, "yujing_readings_total", **dev, quality="good") + 3
    assert value(second, "yujing_polls_unanswered_total", **dev) == 0
    assert value(second, "yujing_device_state", **dev, state="online") == 1
    assert value(second, "yujing_device_state", **dev, state="offline") == 0

    count = value(second, "yujing_transaction_seconds_count", bus="plc")
    assert count >= value(second, "yujing_polls_total", **dev)  # a poll is a transaction here; the coil writes are more
    assert value(second, "yujing_transaction_seconds_bucket", bus="plc", le="+Inf") == count
    assert 0 < value(second, "yujing_transaction_seconds_sum", bus="plc") < count  # loopback: well under a second each
    assert value(second, "yujing_transaction_seconds_bucket", bus="plc", le="0.002") <= value(second, "yujing_transaction_seconds_bucket", bus="plc", le="1.0")

    assert value(first, "yujing_rule_level", rule="gas.lel1") == 0
    assert value(second, "yujing_rule_level", rule="gas.lel1") == 2  # III yellow
    assert value(second, "yujing_rule_level", rule="gateway.fault") == 0
    assert value(second, "yujing_gateway_faults") == 0
    assert value(second, "yujing_action_executions_total", action="siren") > value(first, "yujing_action_executions_total", action="siren")
    assert value(second, "yujing_action_failures_total", action="siren") == 0

    assert value(first, "yujing_commands_rejected_total", reason="shape") == 0
    assert value(second, "yujing_commands_rejected_total", reason="shape") == 1
    assert value(second, "yujing_commands_rejected_total", reason="other") == 0
    assert value(second, "yujing_commands_accepted_total") == 0

    assert value(first, "yujing_uplink_connected") == 1 and value(second, "yujing_uplink_connected") == 1
    assert value(second, "yujing_uplink_reconnects_total") == 0
    assert value(second, "yujing_uplink_acked_total") > 0
    assert value(second, "yujing_uplink_publish_seconds_count") > 0
    assert value(second, "yujing_uplink_rejected_total") == 0
    assert value(third, "yujing_spool_bytes") > 0
    assert value(third, "yujing_spool_oldest_unsent_seconds") < 5


async def test_a_broker_outage_shows_as_backlog_age_and_a_reconnect(private_mosquitto, tmp_path: Path) -> None:
    port = free_port()
    server = SimServer([SimSlave(1)], tcp=("127.0.0.1", port))
    await server.start()
    cfg = site(private_mosquitto.port, tmp_path, SITE.format(port=port))
    try:
        async with running(Gateway(cfg)) as gw:
            await until(lambda: gw.uplink is not None and gw.uplink.connected and gw.readings > 0, what="connected")
            metrics = Metrics(gw)
            private_mosquitto.stop()
            await until(lambda: not gw.uplink.connected, what="the link down")
            await asyncio.sleep(1.5)
            down = parse((await metrics.render_async())[0])
            private_mosquitto.start()
            await until(lambda: gw.uplink.connected, 15, what="the link back")
            up: Samples = {}

            async def drained() -> bool:
                nonlocal up
                up = parse((await metrics.render_async())[0])
                return value(up, "yujing_spool_oldest_unsent_seconds") < 1.0

            deadline = asyncio.get_running_loop().time() + 10
            while not await drained():
                assert asyncio.get_running_loop().time() < deadline, "the backlog did not drain"
                await asyncio.sleep(0.1)
    finally:
        await server.stop()
    assert value(down, "yujing_uplink_connected") == 0
    assert value(down, "yujing_spool_oldest_unsent_seconds") >= 1.4
    assert value(down, "yujing_spool_readings") >= 5
    assert value(down, "yujing_uplink_reconnects_total") == 0
    assert value(up, "yujing_uplink_connected") == 1
    assert value(up, "yujing_uplink_reconnects_total") == 1


def test_a_family_that_fails_is_left_out_of_the_scrape_and_logged_once(caplog) -> None:  # type: ignore[no-untyped-def]
    gateway = SimpleNamespace(config=SimpleNamespace(site=SimpleNamespace(id="S", gateway="G")), clock=SystemClock(),
                              schedulers=[], uplink=None, storage=None, desk=None, outputs=None, health=None,
                              inbox=object())  # no stats: both command families fail
    metrics = Metrics(gateway, process=False)
    with caplog.at_level(logging.ERROR, logger="yujing.metrics"):
        scrapes = [parse(metrics.render()[0]) for _ in range(2)]
    for scrape in scrapes:
        assert value(scrape, "yujing_uplink_connected") == 0
        assert value(scrape, "yujing_gateway_info", site="S", gateway="G", version=__version__) == 1
        assert not {n for n in names(scrape) if n.startswith("yujing_commands")}
    failed = [r for r in caplog.records if "left out" in r.getMessage()]
    assert sorted(r.getMessage().split()[1] for r in failed) == ["yujing_commands_accepted_total", "yujing_commands_rejected_total"]


def test_histogram_buckets_are_cumulative_with_prometheus_bounds() -> None:
    h = Histogram([1.0, 0.1])
    for v in (0.1, 0.5, 2.0):
        h.observe(v)
    buckets, total = h.cumulative()
    assert buckets == [(0.1, 1), (1.0, 2), (float("inf"), 3)] and total == pytest.approx(2.6) and h.count == 3


def test_every_rejection_reason_is_in_the_fixed_set_and_every_metric_is_documented() -> None:
    used = set()
    for path in (ROOT / "gateway").glob("*.py"):
        used |= set(re.findall(r'CommandRejected\(\s*"(\w+)"', path.read_text()))
    assert used and used <= set(REJECT_REASONS), used - set(REJECT_REASONS)
    doc = (ROOT / "docs" / "metrics.md").read_text()
    undocumented = [n for n in [f.name for f in FAMILIES] + list(PROCESS_FAMILIES) if f"`{n}`" not in doc]
    assert not undocumented, undocumented
