"""The node's sample -> alarm -> publish/buffer -> sleep cycle under real MicroPython, with the
simulated board (firmware/host/sim: pins, ADC, I2C, UART devices, RTC memory, deep sleep; the
only fakes, since a host has no such hardware) and an in-memory broker (the WebAssembly port
has no sockets; tests/test_firmware_mqtt.py runs the same code against a real mosquitto).

firmware/host/checks/check_node.py asserts what only the firmware sees (watchdog, deep sleep,
flash writes) and prints everything it published; here the gateway's consumer decodes it.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway import wire
from tests.firmware_helpers import CHECKS, published, run_micropython

T = 1_767_225_600_000
LIVE_VALUES = [Decimal("50.88"), Decimal(0), 25, 56.5, Decimal("12.3"), 25.0]  # fixtures.py's devices


@pytest.fixture(scope="module")
def run() -> str:
    proc = run_micropython(CHECKS / "check_node.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failed" in proc.stdout
    return proc.stdout


def decoded(stdout: str, tag: str, kinds: tuple[str, ...] = ("birth", "data", "death")):
    """The run's messages of `kinds` (alarm events and the alarm state have their own test), decoded by gateway.wire."""
    decoders = {"birth": wire.decode_birth, "data": wire.decode_data, "death": wire.decode_death,
                "alarm": wire.decode_alarm, "alarms": wire.decode_alarms}
    out = []
    for _, topic, payload, qos, retain in published(stdout, tag):
        kind = wire.parse_topic(topic).kind
        if kind in kinds:
            out.append((kind, decoders[kind](payload), qos, retain))
    return out


def test_awake_node_publishes_its_alarm_change_as_the_gateway_does(run: str) -> None:
    """The first sample is at blue: one alarm event (QoS 1, not retained), then the retained state, before data."""
    msgs = decoded(run, "awake", ("birth", "alarm", "alarms", "data"))
    assert [m[0] for m in msgs[:4]] == ["birth", "alarm", "alarms", "data"]
    _, alarm, qos, retain = msgs[1]
    assert (qos, retain, alarm.seq, alarm.historical) == (1, False, 1, False)
    (event,) = alarm.events
    assert (event.rule, wire.LEVEL_NAMES[event.old_level], wire.LEVEL_NAMES[event.new_level]) == (
        "crack.opening", "NONE", "IV_BLUE")
    _, (_, _, states), qos, retain = msgs[2]
    assert (qos, retain) == (1, True)
    assert [(a.rule, wire.LEVEL_NAMES[a.level]) for a in states] == [("crack.opening", "IV_BLUE")]


def test_awake_node_publishes_birth_then_data_the_consumer_reads(run: str) -> None:
    msgs = decoded(run, "awake")
    kind, birth, qos, retain = msgs[0]
    assert (kind, qos, retain) == ("birth", 1, True)
    assert (birth.kind, birth.site, birth.gateway, birth.session, birth.back_at_ms) == (
        "node",
        "xishan",
        "slope-07",
        1,
        None,
    )
    assert [f"{p.device}/{p.name}" for p in birth.catalogue] == [
        "crack/opening",
        "rain/rain",
        "env/temperature",
        "env/humidity",
        "gas/ch4",
        "gas/temp",
    ]
    data = [m[1] for m in msgs[1:]]
    assert [d.seq for d in data] == list(range(1, 8))
    assert not any(d.historical for d in data)
    first = data[0]
    assert [r.value for r in first.readings] == LIVE_VALUES
    assert all(r.ts_ms == T for r in first.readings)
    assert [d.readings[0].ts_ms - T for d in data[:6]] == [0, 10_000, 20_000, 30_000, 40_000, 50_000]


def test_offline_readings_arrive_later_flagged_historical_once_each(run: str) -> None:
    msgs = decoded(run, "offline")
    assert msgs[0][0] == "birth" and msgs[0][1].session == 2
    data = [m[1] for m in msgs if m[0] == "data"]
    assert [d.seq for d in data] == list(range(1, len(data) + 1)), "seq rises by one per message"
    live = [d for d in data if not d.historical]
    hist = [d for d in data if d.historical]
    assert len(hist) >= 2
    backlog = [(r.ts_ms, r.point) for d in hist for r in d.readings]
    assert backlog == sorted(backlog), "historical readings come oldest first"
    assert backlog[:42] == [(T + i * 10_000, p) for i in range(7) for p in range(6)], "the 7 offline cycles first"
    everything = backlog + [(r.ts_ms, r.point) for d in live for r in d.readings]
    assert len(everything) == len(set(everything)) == 14 * 6, "each of the 14 cycles' readings exactly once"
    assert min(r.ts_ms for d in live for r in d.readings) > backlog[-1][0], "live data is the newest"


def test_lost_link_publishes_the_will_and_the_node_recovers(run: str) -> None:
    msgs = decoded(run, "will")
    kinds = [m[0] for m in msgs]
    will = msgs[kinds.index("death")]
    assert (will[1].reason, will[1].session, will[1].ts_ms, will[2], will[3]) == ("lost", 1, None, 1, True)
    after = msgs[kinds.index("death") + 1 :]
    assert after[0][0] == "birth"
    before = [m[1] for m in msgs[: kinds.index("death")] if m[0] == "data"]
    hist = [m[1] for m in after if m[0] == "data" and m[1].historical]
    live = [m[1] for m in after if m[0] == "data" and not m[1].historical]
    lost_ts = {r.ts_ms for r in hist[0].readings}
    assert len(hist) == 1 and len(hist[0].readings) == 6 and len(lost_ts) == 1, "one cycle failed to publish"
    delivered_live = {r.ts_ms for d in before + live for r in d.readings}
    assert lost_ts.isdisjoint(delivered_live), "the failed cycle comes back as historical, not twice"
    assert [d.seq for d in before] == [1, 2] and hist[0].seq == live[-1].seq + 1 == 5, "seq 3 was the lost message"


def test_sleeping_node_says_when_it_is_back(run: str) -> None:
    msgs = decoded(run, "sleep")
    births = [m[1] for m in msgs if m[0] == "birth"]
    deaths = [m for m in msgs if m[0] == "death"]
    assert all(b.back_at_ms is not None for b in births)
    assert [(d[1].reason, d[2], d[3]) for d in deaths] == [("sleeping", 1, True)] * 2
    assert deaths[0][1].back_at_ms == T + 600_000 == births[0].back_at_ms
    assert deaths[1][1].back_at_ms == T + 1_200_000
    assert {b.session for b in births} == {1}, "a scheduled wake continues the session"
    data = [m[1] for m in msgs if m[0] == "data"]
    assert [d.seq for d in data] == [1, 2]
    rain = [r.value for r in data[1].readings if r.point == 1]
    assert rain == [Decimal("0.2")], "the tip that woke the node is counted"


def test_sleeping_node_offline_backlog_is_delivered(run: str) -> None:
    msgs = decoded(run, "sleep_offline")
    data = [m[1] for m in msgs if m[0] == "data"]
    hist = [d for d in data if d.historical]
    assert sum(len(d.readings) for d in hist) == 18
    assert msgs[-1][0] == "death" and msgs[-1][1].reason == "sleeping"


def test_restarts_start_new_sessions_and_never_reuse_a_seq(run: str) -> None:
    msgs = decoded(run, "restart")
    data = [(m[1].session, m[1].seq) for m in msgs if m[0] == "data"]
    assert data == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (3, 68), (3, 69)]
    seqs = [s for _, s in data]
    assert len(set(seqs)) == len(seqs)
    sessions = [m[1].session for m in msgs if m[0] == "birth"]
    assert sessions == [1, 2, 3]
