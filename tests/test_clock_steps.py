"""The wall clock steps (issue 11, the clock part): a gateway that boots at 1970 (no RTC) and is set by NTP,
and clocks that step back. Each fix of gateway.clockcheck's design has its test here; the whole gateway
against a stepping clock is hil_tests/test_clock_faults.py.

Time is real (the monotonic clock) wherever a watch judges steps; the wall clock is
gateway.sim.clock.SteppableClock, the clock of a board without an RTC, stepped by the test as NTP would.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.alarms import AlarmDesk
from gateway.clockcheck import (
    CLOCK_FLOOR_MS,
    ClockWatch,
    StepCursor,
    clock_unset,
    place_restored,
    report_step,
    restamp,
    stamp,
)
from gateway.consumer import Decoder, load_schema
from gateway.health import Health
from gateway.model import PointInfo, Reading
from gateway.rules import Level
from gateway.sim.clock import SteppableClock
from gateway.spool import Spool

from .test_rules_support import SEC, T0, Site, steps

T = 1_764_390_000_000  # 2025-11-29, a set clock
YEARS_56 = T - 5_000  # about what NTP's first step is on a Pi that booted 5 s ago
CAT = [PointInfo("d", "p", "", "uint16"), PointInfo("d", "q", "", "uint16")]


# ---------------------------------------------------------------- the watch


def test_the_watch_sees_steps_both_ways_and_not_the_clock_ticking() -> None:
    clock = SteppableClock()  # 1970 + uptime, as a Pi boots
    watch = ClockWatch(clock)
    assert watch.unset and watch.time_ms() < CLOCK_FLOOR_MS
    for _ in range(100):
        watch.time_ms()
    assert watch.count == 0
    clock.step(YEARS_56)
    watch.time_ms()
    clock.step(-42_000)
    watch.time_ms()
    clock.step(50)  # under 100 ms: slewing territory, not a step
    watch.time_ms()
    first, back = watch.steps_after(0)
    assert (first.number, back.number) == (1, 2)
    assert abs(first.delta_ms - YEARS_56) <= 5 and first.sets and not watch.unset
    assert abs(back.delta_ms + 42_000) <= 5 and not back.sets and not back.unsets
    assert "stepped by -4" in back.describe() and "stepped by +" in first.describe()
    assert watch.steps_after(1) == [back]


def test_a_step_of_a_few_hundred_ms_is_seen() -> None:
    clock = SteppableClock(T)
    watch = ClockWatch(clock)
    clock.step(300)  # ntpd steps from 128 ms
    watch.time_ms()
    assert [abs(s.delta_ms - 300) <= 5 for s in watch.steps_after(0)] == [True]


def test_a_poll_in_flight_during_a_step_is_stamped_on_the_new_clock() -> None:
    clock = SteppableClock()
    watch = ClockWatch(clock)
    ts, seen = stamp(watch)
    assert clock_unset(ts)
    clock.set_to(T)  # NTP, while the device was answering
    fixed = restamp(watch, ts, seen)
    assert not clock_unset(fixed) and abs(fixed - watch.time_ms()) <= 5
    ts2, seen2 = stamp(watch)
    assert restamp(watch, ts2, seen2) == ts2  # no step since: unchanged


def test_each_reader_gets_each_step_once() -> None:
    clock = SteppableClock(T)
    watch = ClockWatch(clock)
    cursor = StepCursor(watch)
    assert cursor.new() == []
    clock.step(-10_000)
    watch.time_ms()
    got = cursor.new()
    assert len(got) == 1 and cursor.new() == []


# ---------------------------------------------------------------- the wire format


def test_the_clock_unset_flag_round_trips_and_matches_the_schema() -> None:
    readings = [Reading(0, 5_000, 7), Reading(1, 5_200, 8)]
    payload = wire.encode_data(3, 1, readings, clock_unset=True)
    data = wire.decode_data(payload)
    assert data.clock_unset and not wire.decode_data(wire.encode_data(3, 2, readings)).clock_unset
    records = list(wire.reading_records(wire.parse_topic("yujing/v1/S/G/data"), data, CAT))
    assert all(r["clock_unset"] is True for r in records)
    event = wire.Event("gateway_fault", "gateway.clock", 0, 0, 5_000, {}, "unset")
    alarm = wire.encode_alarm(3, 1, [event], clock_unset=True)
    assert wire.decode_alarm(alarm).clock_unset
    schema = load_schema()
    if schema is None:
        pytest.skip("pycddl is not installed")
    schema.validate_cbor(payload)
    schema.validate_cbor(alarm)


# ---------------------------------------------------------------- the spool


def _sealed(spool: Spool, now_ms: int) -> list[wire.Data]:
    out = []
    while (m := spool.seal(500, now_ms=now_ms, historical_after_ms=60_000, live=True)) is not None:
        out.append(wire.decode_data(m.payload))
    return out


def test_readings_before_and_after_the_clock_was_set_never_share_a_message(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    session = s.start_session(CAT, 3_000)
    for i in range(5):
        s.append(session, [Reading(0, 3_000 + i * 200, i), Reading(1, 3_000 + i * 200, i)])
    for i in range(5):
        s.append(session, [Reading(0, T + i * 200, 10 + i), Reading(1, T + i * 200, 10 + i)])
    first, second = _sealed(s, T + 1_000)
    assert first.clock_unset and all(clock_unset(r.ts_ms) for r in first.readings) and len(first.readings) == 10
    assert not second.clock_unset and not any(clock_unset(r.ts_ms) for r in second.readings)
    assert len(second.readings) == 10


def test_a_step_back_splits_the_message_so_each_points_poll_order_is_kept(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    session = s.start_session(CAT, T)
    polled = [T, T + 200, T + 400, T - 30_000, T - 29_800]  # the clock stepped back 30.6 s after the third poll
    for i, ts in enumerate(polled):
        s.append(session, [Reading(0, ts, i)])
    messages = _sealed(s, T)
    assert len(messages) == 2
    assert [r.value for m in messages for r in m.readings] == [0, 1, 2, 3, 4]  # by seq, then in the message
    assert [r.ts_ms for m in messages for r in m.readings] == polled


def test_polls_of_other_points_a_little_out_of_time_order_still_share_a_message(tmp_path: Path) -> None:
    """Two buses: the one that answered first is stored first with the later stamp. No step, no split."""
    s = Spool(tmp_path / "spool")
    session = s.start_session(CAT, T)
    s.append(session, [Reading(1, T + 120, 1)])
    s.append(session, [Reading(0, T + 100, 2)])
    s.append(session, [Reading(1, T + 320, 3)])
    assert len(_sealed(s, T)) == 1


def test_events_stamped_while_the_clock_was_unset_are_flagged(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    session = s.start_session(CAT, 2_000)
    s.append_events(session, [wire.Event("gateway_fault", "gateway.clock", 0, 0, 2_000, {}, "unset")])
    s.append_events(session, [wire.Event("gateway_ok", "gateway.clock", 0, 0, T, {}, "stepped by +1 ms")])
    first = s.seal_alarms(100, now_ms=T, historical_after_ms=60_000)
    second = s.seal_alarms(100, now_ms=T, historical_after_ms=60_000)
    assert first is not None and second is not None
    a, b = wire.decode_alarm(first.payload), wire.decode_alarm(second.payload)
    assert a.clock_unset and [e.rule for e in a.events] == ["gateway.clock"]
    assert not b.clock_unset and b.events[0].kind == "gateway_ok"


# ---------------------------------------------------------------- the rules


DELAYED = """
[[rules]]
kind = "threshold"
id = "lvl"
point = "d.p"
on_delay_s = 10
levels = [ { level = "II_ORANGE", set = 50, clear = 45 } ]
  [rules.fault]
  interval_s = 1
"""


def test_after_a_step_back_the_next_readings_are_not_ignored() -> None:
    """Before the fix, a reading stamped no later than the last was dropped as stale: a step back of 30 s
    left the rule blind for 30 s."""
    site = Site(DELAYED.replace("on_delay_s = 10", "on_delay_s = 0"))
    site.read("d.p", T0, 10)
    site.engine.shift_time(-30 * SEC)
    out = site.read("d.p", T0 - 29 * SEC, 80)  # a second later, on the new clock
    assert steps(out) == [("raised", "NONE", "II_ORANGE")]
    blind = Site(DELAYED.replace("on_delay_s = 10", "on_delay_s = 0"))  # the same without the shift: ignored
    blind.read("d.p", T0, 10)
    assert blind.read("d.p", T0 - 29 * SEC, 80) == []


def test_an_on_delay_lasts_its_real_time_across_steps_both_ways() -> None:
    site = Site(DELAYED)
    site.read("d.p", T0, 80)  # the condition starts; 10 s to go
    site.engine.shift_time(-60 * SEC)  # 1 s later the clock steps back a minute
    assert site.read("d.p", T0 - 59 * SEC + 8 * SEC, 80) == []  # 9 s real: not yet
    out = site.read("d.p", T0 - 59 * SEC + 9 * SEC, 80)  # 10 s real
    assert steps(out) == [("raised", "NONE", "II_ORANGE")]
    ahead = Site(DELAYED)
    ahead.read("d.p", T0, 80)
    ahead.engine.shift_time(3_600 * SEC)  # an hour forward: not an hour of condition
    assert ahead.engine.tick(T0 + 3_600 * SEC + 2 * SEC) == []
    assert ahead.level("lvl") == Level.NONE


def test_ntp_setting_the_clock_is_no_stale_input_and_alarm_since_moves_with_it() -> None:
    site = Site(DELAYED.replace("on_delay_s = 10", "on_delay_s = 0"))
    boot = 4_000  # 1970, four seconds after power-on
    site.read("d.p", boot, 80)
    assert site.state("lvl").since_ms == boot
    site.engine.shift_time(T - boot - 500)
    assert site.engine.tick(T + 500) == []  # a second after the last reading: not stale
    assert site.state("lvl").since_ms == T - 500 and not site.state("lvl").fault
    unshifted = Site(DELAYED.replace("on_delay_s = 10", "on_delay_s = 0"))
    unshifted.read("d.p", boot, 80)
    assert any(str(t.kind) == "fault" for t in unshifted.engine.tick(T + 500))  # what the shift prevents


def test_rate_and_rain_windows_move_with_the_clock() -> None:
    rate = Site("""
[[rules]]
kind = "rate"
id = "rise"
point = "d.p"
window_s = 60
per_s = 60
direction = "rise"
levels = [ { level = "III_YELLOW", set = 1.0, clear = 0.5 } ]
""")
    for i in range(5):
        rate.read("d.p", T0 + i * 10 * SEC, 0.0)
    rate.engine.shift_time(-120 * SEC)
    out = rate.read("d.p", T0 + 50 * SEC - 120 * SEC, 1.5)  # +1.5 in the last 50 s real: 1.8 per minute
    assert steps(out) == [("raised", "NONE", "III_YELLOW")]
    rain = Site("""
[[rules]]
kind = "accumulation"
id = "rain"
point = "d.p"
levels = [ { level = "IV_BLUE", window_s = 3600, set = 30.0, clear = 25.0 } ]
""")
    rain.read("d.p", T0, 0.0)
    rain.read("d.p", T0 + 60 * SEC, 20.0)
    rain.engine.shift_time(YEARS_56)
    out = rain.read("d.p", T0 + 120 * SEC + YEARS_56, 35.0)  # 35 mm in two minutes: the hour's sum, exact
    assert steps(out) == [("raised", "NONE", "IV_BLUE")]


# ---------------------------------------------------------------- the desk and the gateway's report


class _Events:
    def __init__(self) -> None:
        self.events: list[wire.Event] = []

    def append_events(self, events: Any) -> None:
        self.events.extend(events)


def test_the_desk_moves_the_rules_and_reports_each_step() -> None:
    clock = SteppableClock()
    watch = ClockWatch(clock)
    health = Health(watch)
    health.fault("clock", "unset")  # as Gateway.run raises it at start
    site = Site(DELAYED.replace("on_delay_s = 10", "on_delay_s = 0"))
    sink = _Events()
    cursor = StepCursor(watch)
    desk = AlarmDesk(site.engine, watch, session=1, events=sink, health=health,
                     clock_steps=cursor.new, on_clock_step=lambda step: report_step(health, step))
    point = site.index["d.p"]
    desk.on_readings([Reading(point, watch.time_ms(), 10)])
    clock.set_to(T)
    time.sleep(0.002)  # polls are milliseconds apart at least
    desk.on_readings([Reading(point, watch.time_ms(), 10)])
    clock.step(-20_000)
    time.sleep(0.002)
    desk.on_readings([Reading(point, watch.time_ms(), 80)])  # seen at once, on the stepped clock
    kinds = [(e.kind, e.rule) for e in sink.events]
    assert ("gateway_ok", "gateway.clock") in kinds and ("gateway_fault", "gateway.clock.step") in kinds
    assert ("raised", "lvl") in kinds
    assert "clock" not in health.faults
    back = next(e for e in sink.events if e.rule == "gateway.clock.step")
    assert "stepped by -" in back.message


# ---------------------------------------------------------------- the consumer


def test_the_consumer_reports_a_step_back_and_keeps_every_reading() -> None:
    d = Decoder()
    topic = "yujing/v1/S/G/data"
    d.feed("yujing/v1/S/G/birth", wire.encode_birth(session=1, ts_ms=T, site="S", gateway="G", software="x",
                                                    catalogue=CAT))
    a = d.feed(topic, wire.encode_data(1, 1, [Reading(0, T, 1), Reading(0, T + 200, 2)]))
    b = d.feed(topic, wire.encode_data(1, 2, [Reading(0, T - 30_000, 3)]))
    c = d.feed(topic, wire.encode_data(1, 3, [Reading(0, T - 29_800, 4)]))
    old = d.feed(topic, wire.encode_data(1, 4, [Reading(0, T - 90_000, 5)], historical=True))  # its own lane
    assert [r["value"] for x in (a, b, c, old) for r in x.records] == [1, 2, 3, 4, 5]
    assert [n for n in b.notices if "clock stepped back" in n] and not c.notices and not old.notices
    assert d.clock_steps_back == 1 and d.duplicates == 0 and d.gaps == 0


def test_setting_the_clock_moves_what_was_stamped_since_boot_not_what_was_restored() -> None:
    site = Site(DELAYED.replace("on_delay_s = 10", "on_delay_s = 0") + """
[[rules]]
kind = "threshold"
id = "other"
point = "d.q"
levels = [ { level = "II_ORANGE", set = 50, clear = 45 } ]
""")
    site.read("d.p", T - 60 * SEC, 80)  # raised before the reboot, on a set clock (as restored from alarms.json)
    site.read("d.q", 4_000, 80)  # raised after it, at 1970 + 4 s
    site.engine.shift_time(T - 5_000, before_ms=CLOCK_FLOOR_MS)
    assert site.state("lvl").since_ms == T - 60 * SEC
    assert site.state("other").since_ms == T - 1_000


def test_polls_that_waited_for_the_link_at_1970_are_sealed_flagged_when_the_clock_is_set(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    session = s.start_session(CAT, 2_000)
    for i in range(10):  # the uplink is away; nothing is sealed yet
        s.store([(session, [Reading(0, 2_000 + i * 200, i)])], [], now_ms=2_000 + i * 200)
    s.store([(session, [Reading(0, T, 99)])], [], now_ms=T)  # NTP: the first poll on a set clock ages the rest
    sealed = []
    while (m := s.seal(500, now_ms=T, historical_after_ms=60_000)) is not None:  # the backlog, then the live poll
        sealed.append(wire.decode_data(m.payload))
    flagged = [r.value for d in sealed if d.clock_unset for r in d.readings]
    assert flagged == list(range(10)) and all(d.historical for d in sealed if d.clock_unset)
    assert [r.value for d in sealed if not d.clock_unset for r in d.readings] == [99]


def test_texts_wait_for_the_platforms_real_absence_whatever_the_clock_does() -> None:
    """`only_when_uplink_down_s`: measured on the monotonic clock. Before, an alarm raised after NTP stepped
    the clock back during an outage was stamped before the outage began and was never texted. (The modem
    and the uplink are not needed for the decision: a namespace stands in for the stage's context.)"""
    from types import SimpleNamespace

    from gateway.uplink.base import MainLink
    from gateway.uplink.sms import SmsUplink

    clock = SteppableClock(T)
    main = MainLink(connected=False, down_since_ms=clock.time_ms())
    sms = SmsUplink.__new__(SmsUplink)
    sms.config = SimpleNamespace(only_when_uplink_down_s=0.3)
    sms.ctx = SimpleNamespace(clock=clock, main=main)
    sms._down = None
    assert not sms._platform_away(sms._on_monotonic(clock.time_ms()))  # away, but not long enough yet
    clock.step(-60_000)  # NTP steps back a minute during the outage
    came = sms._on_monotonic(clock.time_ms())  # an alarm now
    assert not sms._platform_away(came)
    time.sleep(0.35)
    assert sms._platform_away(came)
    main.down_since_ms = clock.time_ms()  # a new outage, seen at once
    assert not sms._platform_away(sms._on_monotonic(clock.time_ms()))
    clock.step(3_600_000)  # an hour forward: the outage is not an hour old
    assert not sms._platform_away(sms._on_monotonic(clock.time_ms()))


RISE = """
[[rules]]
kind = "rate"
id = "rise"
point = "d.p"
window_s = 600
per_s = 60
direction = "rise"
levels = [ { level = "III_YELLOW", set = 1.0, clear = 0.5 } ]
"""


def test_a_reboot_at_1970_keeps_the_restored_rate_history_usable() -> None:
    """Every start of a Pi without an RTC is at 1970, with the rule state saved on a set clock. Before, that
    history lay in the 1970 future: the rate had a negative span and the rule stayed blind until NTP."""
    before = Site(RISE)
    for i in range(10):
        before.read("d.p", T + i * 30 * SEC, 0.0)
    saved = before.engine.export_state()

    class Saved:
        def load(self) -> Any:
            return saved

        def save(self, state: Any) -> None:
            pass

    def boot(place: bool) -> list[str]:
        site = Site(RISE, store=Saved())
        if place:
            assert place_restored(site.engine, 5_000) < 0
        out = []
        for i in range(1, 10):  # after the reboot the level rises 6 per minute (1.5 per minute over the window)
            out += site.read("d.p", 5_000 + i * 10 * SEC, float(i))
        site.engine.shift_time(T, before_ms=CLOCK_FLOOR_MS)  # NTP, later: every placed instant moves with it
        assert not place or site.engine.newest_time() == T + 5_000 + 90 * SEC
        return [str(t.kind) for t in out]

    assert "raised" in boot(place=True)
    assert boot(place=False) == []  # what the placing prevents


async def test_a_poll_whose_read_spans_the_ntp_step_is_stamped_on_the_new_clock(
    mosquitto, tmp_path: Path
) -> None:
    """A real gateway and a real Modbus TCP slave; the slave's read hook sets the clock while the gateway's
    request is being answered (as NTP might at any moment), so the poll in flight was stamped at 1970."""
    from gateway.app import Gateway
    from gateway.sim.devices import SimServer, SimSlave
    from tests.conftest import free_port
    from tests.e2e import running, site

    clock = SteppableClock()
    reads = 0
    stepped_at: list[int] = []

    def during_read(_registers: list[int]) -> None:
        nonlocal reads
        reads += 1
        if reads == 5:
            clock.set_to(T)
            stepped_at.append(len(polls))

    port = free_port()
    server = SimServer([SimSlave(1, before_read=during_read)], tcp=("127.0.0.1", port))
    await server.start()
    polls: list[list[int]] = []
    try:
        body = (f'[[buses]]\nname = "plc"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\n\n'
                '[[devices]]\nname = "d"\nbus = "plc"\nunit = 1\ninterval_s = 0.05\n'
                '  [[devices.points]]\n  name = "p"\n  address = 0\n'
                '  [[devices.points]]\n  name = "q"\n  address = 1\n')
        gw = Gateway(site(mosquitto.port, tmp_path, body), clock=clock)
        sink = gw._sink

        def counting(readings: list[Reading]) -> None:
            polls.append([r.ts_ms for r in readings])
            sink(readings)

        gw._sink = counting  # type: ignore[method-assign]
        async with running(gw):
            while len(polls) < 10:
                await asyncio.sleep(0.02)
    finally:
        await server.stop()
    assert stepped_at == [4]  # the fifth read: the fifth poll was in flight
    assert all(clock_unset(ts) for poll in polls[:4] for ts in poll)
    assert not any(clock_unset(ts) for poll in polls[4:] for ts in poll)
    assert abs(polls[4][0] - T) < 1_000
