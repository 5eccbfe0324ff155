"""Latching, acknowledgement, and latched state surviving a restart (KM-CHEM-01 scenario 4)."""

from __future__ import annotations

import json
import os

import pytest

from gateway.rules import (
    FileStateStore,
    Level,
    MemoryStateStore,
    RuleStateError,
    TransitionKind,
    UnknownRuleError,
)

from .test_rules_support import MIN, SEC, T0, Site, brief, steps

# 一级 25 %LEL → yellow, 二级 50 %LEL → orange; latched until below threshold − 2 %LEL and acknowledged.
GAS = """
[[rules]]
kind = "threshold"
id = "chem.gas1"
point = "ai.ch0"
levels = [ { level = "III_YELLOW", set = 25.0, clear = 23.0 }, { level = "II_ORANGE", set = 50.0, clear = 48.0 } ]
latch = true

[[rules]]
kind = "threshold"
id = "chem.tank.temp"
point = "ai.ch5"
levels = [ { level = "III_YELLOW", set = 40.0, clear = 39.0 } ]
"""


def test_latched_alarm_holds_its_highest_level_until_acknowledged():
    site = Site(GAS)
    out = site.series("ai.ch0", T0, SEC, [10.0, 30.0, 55.0, 20.0, 5.0])
    assert steps(out) == [("raised", "NONE", "III_YELLOW"), ("escalated", "III_YELLOW", "II_ORANGE")]
    state = site.state("chem.gas1")
    assert (state.level, state.condition, state.latched, state.acked) == (Level.II_ORANGE, Level.NONE, True, False)
    out = site.engine.acknowledge("chem.gas1", "operator:li", T0 + 10 * SEC)
    assert [(t.kind, t.old_level, t.new_level, t.by) for t in out] == [
        (TransitionKind.ACKNOWLEDGED, Level.II_ORANGE, Level.II_ORANGE, "operator:li"),
        (TransitionKind.CLEARED, Level.II_ORANGE, Level.NONE, "operator:li"),
    ]
    assert all(t.ts_ms == T0 + 10 * SEC for t in out)
    assert site.state("chem.gas1").latched is False


def test_acknowledged_while_the_condition_holds_clears_when_it_clears():
    site = Site(GAS)
    site.series("ai.ch0", T0, SEC, [30.0, 55.0])
    out = site.engine.acknowledge("chem.gas1", "operator:li", T0 + 2 * SEC)
    assert [t.kind for t in out] == [TransitionKind.ACKNOWLEDGED]
    assert site.state("chem.gas1").acked and site.level("chem.gas1") == Level.II_ORANGE
    assert site.engine.acknowledge("chem.gas1", "operator:li", T0 + 3 * SEC) == []  # idempotent
    out = site.series("ai.ch0", T0 + 4 * SEC, SEC, [49.0, 30.0, 22.0])
    assert steps(out) == [("de_escalated", "II_ORANGE", "III_YELLOW"), ("cleared", "III_YELLOW", "NONE")]
    assert out[0].ts_ms == T0 + 5 * SEC  # 49 holds orange (≥ clear 48); 30 drops to yellow
    # a new rise needs a new acknowledgement
    out = site.read("ai.ch0", T0 + 10 * SEC, 60.0)
    assert steps(out) == [("raised", "NONE", "II_ORANGE")] and not site.state("chem.gas1").acked


def test_latched_alarm_escalates_again_after_a_partial_drop():
    site = Site(GAS)
    site.series("ai.ch0", T0, SEC, [55.0, 30.0])  # condition yellow, shown orange
    assert site.level("chem.gas1") == Level.II_ORANGE
    site.engine.acknowledge("chem.gas1", "op", T0 + 2 * SEC)
    assert site.level("chem.gas1") == Level.III_YELLOW  # released to what the condition supports
    out = site.read("ai.ch0", T0 + 3 * SEC, 52.0)
    assert steps(out) == [("escalated", "III_YELLOW", "II_ORANGE")]


def test_acknowledging_a_non_latched_alarm_records_the_ack_only():
    site = Site(GAS)
    site.read("ai.ch5", T0, 41.0)
    out = site.engine.acknowledge("chem.tank.temp", "op", T0 + SEC)
    assert [t.kind for t in out] == [TransitionKind.ACKNOWLEDGED]
    assert site.level("chem.tank.temp") == Level.III_YELLOW and site.state("chem.tank.temp").acked


def test_acknowledge_errors_and_nothing_to_acknowledge():
    site = Site(GAS)
    assert site.engine.acknowledge("chem.gas1", "op", T0) == []  # at NONE
    with pytest.raises(UnknownRuleError, match="chem.gas9"):
        site.engine.acknowledge("chem.gas9", "op", T0)
    with pytest.raises(ValueError, match="by"):
        site.engine.acknowledge("chem.gas1", " ", T0)


def test_latched_state_survives_a_restart_through_the_file_store(tmp_path):
    path = tmp_path / "alarms.json"
    first = Site(GAS, store=FileStateStore(path))
    first.series("ai.ch0", T0, SEC, [30.0, 55.0, 10.0])
    first.read("ai.ch5", T0, 45.0)
    # saved at the transition itself: no clean shutdown needed (kill -9)
    saved = json.loads(path.read_text())
    assert saved["rules"]["chem.gas1"] == {"level": 3, "active": 0, "acked": False, "since_ms": T0 + SEC}
    assert os.listdir(tmp_path) == ["alarms.json"]  # the temporary file was renamed away
    del first

    second = Site(GAS, store=FileStateStore(path))
    state = second.state("chem.gas1")
    assert (state.level, state.latched, state.since_ms) == (Level.II_ORANGE, True, T0 + SEC)
    assert second.read("ai.ch0", T0 + MIN, 5.0) == []  # still latched
    # the non-latched alarm was restored as active; its condition cleared while we were down
    assert steps(second.read("ai.ch5", T0 + MIN, 20.0)) == [("cleared", "III_YELLOW", "NONE")]
    out = second.engine.acknowledge("chem.gas1", "operator:wang", T0 + 2 * MIN)
    assert steps(out) == [("acknowledged", "II_ORANGE", "II_ORANGE"), ("cleared", "II_ORANGE", "NONE")]
    assert json.loads(path.read_text())["rules"] == {}

    third = Site(GAS, store=FileStateStore(path))
    assert all(s.level == Level.NONE for s in third.engine.snapshot().values())


def test_restart_restores_an_acknowledgement_in_progress():
    store = MemoryStateStore()
    first = Site(GAS, store=store)
    first.series("ai.ch0", T0, SEC, [55.0])
    first.engine.acknowledge("chem.gas1", "op", T0 + SEC)
    second = Site(GAS, store=store)
    assert second.state("chem.gas1").acked
    assert steps(second.read("ai.ch0", T0 + MIN, 5.0)) == [("cleared", "II_ORANGE", "NONE")]


def test_unreadable_state_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "alarms.json"
    path.write_text("{not json")
    with pytest.raises(RuleStateError, match="alarms.json"):
        Site(GAS, store=FileStateStore(path))
    path.write_text(json.dumps({"version": 1, "rules": {"chem.gas1": {"level": 7, "active": 0}}}))
    with pytest.raises(RuleStateError, match=r"chem.gas1.*level"):
        Site(GAS, store=FileStateStore(path))


def test_state_of_a_rule_no_longer_configured_is_skipped():
    store = MemoryStateStore({"version": 1, "rules": {"gone": {"level": 4, "active": 4, "acked": False}}})
    site = Site(GAS, store=store)
    assert site.level("chem.gas1") == Level.NONE


class FailingStore(MemoryStateStore):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def save(self, state) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        super().save(state)


def test_a_failed_save_never_loses_transitions_and_is_retried_on_tick():
    store = FailingStore()
    site = Site(GAS, store=store)
    out = site.read("ai.ch0", T0, 55.0)
    assert brief(out) == [("raised", "chem.gas1", "II_ORANGE")]
    assert isinstance(site.engine.store_error, OSError)
    store.broken = False
    site.engine.tick(T0 + SEC)
    assert site.engine.store_error is None
    assert store.state["rules"]["chem.gas1"]["level"] == 3
