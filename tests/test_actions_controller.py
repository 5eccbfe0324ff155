"""The controller's semantics with the real alarm engine and gpiozero's MockFactory.

Bus writes go to a recording BusWriter here (the real bus is covered by tests/test_actions_modbus.py); it
stands in only where a test needs a writer that hangs or fails on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
from gpiozero.pins.mock import MockFactory

from gateway.actions import (
    ActionConfigError,
    ActionController,
    ActuatorEvent,
    parse_actions,
)
from gateway.clock import SystemClock
from gateway.model import Reading
from gateway.rules import AlarmEngine, Level, parse_rules

T0 = 1_752_537_600_000


class RecordingWriter:
    """A BusWriter that records writes; `hang` makes writes wait forever, `error` makes them fail."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int, int, int | bool]] = []
        self.hang = False
        self.error: Exception | None = None

    async def write(self, kind: str, unit: int, address: int, value: int | bool) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        self.writes.append((kind, unit, address, value))


@contextlib.asynccontextmanager
async def running(c: ActionController) -> AsyncIterator[ActionController]:
    task = asyncio.create_task(c.run())
    try:
        yield c
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        c.close()


async def until(predicate: Callable[[], object], timeout: float = 2.0, what: str = "") -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


LATCHED_GAS = parse_rules([{
    "kind": "threshold", "id": "gas.lel1", "point": "ai.lel1", "latch": True,
    "levels": [{"level": "III_YELLOW", "set": 25, "clear": 23}, {"level": "II_ORANGE", "set": 50, "clear": 48}],
}, {
    "kind": "threshold", "id": "res.zu", "point": "radar.zu", "levels": [{"level": "red", "set": 1956.8}],
}])


def chem_actions(rule_ids) -> tuple:
    return parse_actions([
        {"kind": "coil", "name": "siren", "bus": "rs485-b", "unit": 30, "address": 0, "when": {"rules": ["gas.*"], "level": "II_ORANGE"}},
        {"kind": "coil", "name": "fan", "bus": "rs485-b", "unit": 30, "address": 1, "invert": True,
         "when": {"rules": ["gas.lel1"], "level": "orange"}},
        {"kind": "register", "name": "panel", "bus": "rs485-b", "unit": 31, "address": 16, "value_on": 3, "value_off": 0,
         "when": {"rules": ["gas.*", "res.zu"], "level": "yellow"}},
    ], buses={"rs485-b": "rtu"}, rule_ids=rule_ids)


async def test_a_latched_alarm_keeps_the_outputs_on_until_acknowledged() -> None:
    engine = AlarmEngine(LATCHED_GAS, {"ai.lel1": 0, "radar.zu": 1}.__getitem__)
    writer = RecordingWriter()
    c = ActionController(chem_actions(engine.rule_ids), {"rs485-b": writer}, SystemClock())

    def feed(value: float, ts: int) -> None:
        transitions = engine.evaluate(Reading(0, ts, value))
        c.update({rule: s.level for rule, s in engine.snapshot().items()}, transitions)

    def state() -> dict[tuple[int, int], int | bool]:
        out: dict[tuple[int, int], int | bool] = {}
        for _, unit, address, value in writer.writes:
            out[(unit, address)] = value
        return out

    async with running(c):
        feed(10, T0)
        await until(lambda: len(writer.writes) == 3, what="the initial writes")
        assert state() == {(30, 0): False, (30, 1): True, (31, 16): 0}  # fan inverted: energised = off
        feed(30, T0 + 1000)  # 一级 → yellow: the panel only
        await until(lambda: state()[(31, 16)] == 3, what="panel pattern 3")
        assert state()[(30, 0)] is False
        feed(55, T0 + 2000)  # 二级 → orange: siren and fan
        await until(lambda: state()[(30, 0)] is True and state()[(30, 1)] is False, what="siren and fan")
        writes = len(writer.writes)
        feed(10, T0 + 3000)  # the gas is gone, but the alarm is latched at orange
        await asyncio.sleep(0.05)
        assert engine.level("gas.lel1") == Level.II_ORANGE
        assert len(writer.writes) == writes, "a latched level keeps the outputs as they are"
        transitions = engine.acknowledge("gas.lel1", "operator:li", T0 + 4000)
        c.update({rule: s.level for rule, s in engine.snapshot().items()}, transitions)
        await until(lambda: state() == {(30, 0): False, (30, 1): True, (31, 16): 0}, what="all off after the acknowledgement")
    assert c.faults == {}


async def test_nothing_is_written_before_the_first_update_then_each_state_once() -> None:
    writer = RecordingWriter()
    c = ActionController(chem_actions(["gas.lel1", "res.zu"]), {"rs485-b": writer}, SystemClock())
    async with running(c):
        await asyncio.sleep(0.05)
        assert writer.writes == [], "no state is known before the first update()"
        for _ in range(5):
            c.update({"gas.lel1": Level.II_ORANGE, "res.zu": Level.NONE}, ())
        await until(lambda: len(writer.writes) == 3)
        await asyncio.sleep(0.05)
        assert sorted(writer.writes) == [("coil", 30, 0, True), ("coil", 30, 1, False), ("register", 31, 16, 3)]
        c.update({"res.zu": Level.I_RED}, ())  # gas.lel1 missing from the mapping counts as NONE
        await until(lambda: len(writer.writes) == 5)
        assert sorted(writer.writes[3:]) == [("coil", 30, 0, False), ("coil", 30, 1, True)]
        assert c.status()["panel"] == {**c.status()["panel"], "desired": True, "applied": True}


async def test_a_write_that_never_returns_is_bounded_then_retried() -> None:
    writer = RecordingWriter()
    writer.hang = True
    events: list[ActuatorEvent] = []
    configs = parse_actions([{"kind": "coil", "name": "siren", "bus": "b", "unit": 10, "address": 0,
                              "when": {"rules": ["*"], "level": "orange"}}], buses={"b": "rtu"}, rule_ids=["gas.lel1"])
    c = ActionController(configs, {"b": writer}, SystemClock(), on_event=events.append, write_timeout_s=0.2,
                         backoff_min_s=0.05, backoff_max_s=0.1)
    async with running(c):
        c.update({"gas.lel1": Level.I_RED}, ())
        took = await until(lambda: events, what="the timeout fault")
        assert 0.15 < took < 0.5
        assert events[0].message == "bus b unit 10 coil 0: not confirmed within 0.2 s (bus busy or reconnecting, or its scheduler is not running)"
        writer.hang = False
        await until(lambda: len(events) == 2, what="actuator_ok")
        assert events[1].kind == "actuator_ok" and writer.writes == [("coil", 10, 0, True)]


async def test_backoff_doubles_up_to_its_cap() -> None:
    writer = RecordingWriter()
    writer.error = OSError("port gone")
    configs = parse_actions([{"kind": "register", "name": "panel", "bus": "b", "unit": 1, "address": 0, "value_on": 1,
                              "value_off": 0, "when": {"rules": ["*"], "level": "blue"}}], buses={"b": "tcp"}, rule_ids=["a"])
    attempts: list[float] = []
    real_write = writer.write

    async def timed(*args) -> None:
        attempts.append(time.monotonic())
        await real_write(*args)

    writer.write = timed  # type: ignore[method-assign]
    c = ActionController(configs, {"b": writer}, SystemClock(), backoff_min_s=0.02, backoff_max_s=0.08)
    async with running(c):
        c.update({"a": Level.IV_BLUE}, ())
        await until(lambda: len(attempts) >= 6, what="six attempts")
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # 0.02, 0.04, then capped at 0.08 (loose upper bounds: the event loop may be slow on a busy machine)
    assert 0.015 <= gaps[0] < 0.06 and 0.035 <= gaps[1] < 0.09, gaps
    assert all(0.075 <= g < 0.15 for g in gaps[3:5]), gaps
    assert "port gone" in c.faults["panel"]


async def test_gpio_with_mock_pins_active_low_and_reasserted() -> None:
    factory = MockFactory()
    configs = parse_actions([
        {"kind": "gpio", "name": "siren", "pin": 17, "when": {"rules": ["gas.*"], "level": "II_ORANGE"}},
        {"kind": "gpio", "name": "strobe", "pin": "GPIO27", "active_high": False, "when": {"rules": ["gas.*"], "level": "yellow"}},
    ], buses={}, rule_ids=["gas.lel1"])
    c = ActionController(configs, {}, SystemClock(), pin_factory=factory, reassert_s=0.1)
    async with running(c):
        c.update({"gas.lel1": Level.III_YELLOW}, ())
        await until(lambda: factory.pin(27).state is False and c.status()["siren"]["applied"] is False, what="yellow")
        assert factory.pin(17).state is False  # strobe on = pin low (active low); siren off
        c.update({"gas.lel1": Level.I_RED}, ())
        await until(lambda: factory.pin(17).state is True, what="siren on")
        factory.pin(17).state = False  # something else switched the relay off
        assert factory.pin(17).state is False
        await until(lambda: factory.pin(17).state is True, 0.5, "the reassert")
        c.update({"gas.lel1": Level.NONE}, ())
        await until(lambda: factory.pin(17).state is False and factory.pin(27).state is True, what="all off")
    assert c.faults == {}


async def test_gpio_faults_name_the_pin(monkeypatch) -> None:
    events: list[ActuatorEvent] = []
    configs = parse_actions([
        {"kind": "gpio", "name": "bad", "pin": "NOSUCHPIN", "when": {"rules": ["*"], "level": "blue"}},
    ], buses={}, rule_ids=["a"])
    c = ActionController(configs, {}, SystemClock(), pin_factory=MockFactory(), on_event=events.append)
    async with running(c):
        c.update({"a": Level.I_RED}, ())
        await until(lambda: events, what="the fault")
    assert "gpio pin NOSUCHPIN: setting on failed" in events[0].message

    monkeypatch.setitem(sys.modules, "gpiozero", None)  # the optional extra is not installed
    configs = parse_actions([{"kind": "gpio", "name": "siren", "pin": 17, "when": {"rules": ["*"], "level": "blue"}}],
                            buses={}, rule_ids=["a"])
    c = ActionController(configs, {}, SystemClock(), on_event=events.append)
    async with running(c):
        c.update({"a": Level.I_RED}, ())
        await until(lambda: len(events) == 2, what="the fault")
    assert events[1].message == "gpio pin 17: gpiozero is not installed (pip install 'yujing[gpio]')"


async def test_update_never_raises_and_a_broken_callback_is_contained(caplog) -> None:
    writer = RecordingWriter()
    writer.error = OSError("boom")

    def explode(event: ActuatorEvent) -> None:
        raise RuntimeError("spool is full")

    c = ActionController(chem_actions(["gas.lel1", "res.zu"]), {"rs485-b": writer}, SystemClock(), on_event=explode)
    c.update(None, None)  # type: ignore[arg-type]
    assert "update failed" in caplog.text
    async with running(c):
        c.update({"gas.lel1": Level.I_RED}, ())
        await until(lambda: len(c.faults) == 3, what="three faults")
    assert "on_event callback failed" in caplog.text
    assert all("boom" in m for m in c.faults.values())


def test_a_bus_without_a_writer_is_a_config_error() -> None:
    configs = chem_actions(["gas.lel1", "res.zu"])
    with pytest.raises(ActionConfigError) as e:
        ActionController(configs, {"rs485-a": RecordingWriter()}, SystemClock())
    assert e.value.path == "actions[0].bus" and "rs485-a" in e.value.reason


@pytest.mark.parametrize("key", ["reassert_s", "backoff_min_s", "write_timeout_s", "max_pending"])
def test_timing_options_must_be_positive(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ActionController((), {}, SystemClock(), **{key: 0})


async def test_run_with_no_actions_waits_until_cancelled() -> None:
    c = ActionController((), {}, SystemClock())
    task = asyncio.create_task(c.run())
    await asyncio.sleep(0.02)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_run_during_a_write_stops_it_promptly() -> None:
    writer = RecordingWriter()
    writer.hang = True  # a write in flight when the gateway stops
    configs = parse_actions([{"kind": "coil", "name": "siren", "bus": "b", "unit": 10, "address": 0,
                              "when": {"rules": ["*"], "level": "orange"}}], buses={"b": "rtu"}, rule_ids=["a"])
    c = ActionController(configs, {"b": writer}, SystemClock(), write_timeout_s=30)
    task = asyncio.create_task(c.run())
    c.update({"a": Level.I_RED}, ())
    await until(lambda: c.status()["siren"]["attempts"] == 1, what="the write to start")
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert done, "run() must end when cancelled, not treat the cancellation as a failed write"
    assert task.cancelled()
