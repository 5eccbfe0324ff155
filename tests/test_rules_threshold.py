"""Threshold rules: hysteresis, on/off delays, escalation order, low thresholds (KM-RES-01, KM-CHEM-01)."""

from __future__ import annotations

from decimal import Decimal

from gateway.model import Quality
from gateway.rules import Level, TransitionKind

from .test_rules_support import MIN, SEC, T0, Site, steps

# KM-RES-01 reservoir level ZU (m): blue 1953.20, yellow 1953.50 (汛限), orange 1956.20, red 1956.80.
RESERVOIR = """
[[rules]]
kind = "threshold"
id = "res.zu"
point = "radar.ZU"
levels = [
  { level = "IV_BLUE",    set = 1953.20, clear = 1953.15 },
  { level = "III_YELLOW", set = 1953.50, clear = 1953.45 },
  { level = "II_ORANGE",  set = 1956.20, clear = 1956.15 },
  { level = "I_RED",      set = 1956.80, clear = 1956.75 },
]
"""


def zu(extra: str = "", clear_margin: str | None = None) -> Site:
    text = RESERVOIR + extra
    if clear_margin is not None:
        text = text.replace("clear = 1953.45", f"clear = {clear_margin}")
    return Site(text)


def test_escalation_and_de_escalation_pass_through_every_level_in_order():
    site = zu()
    values = [1953.00, 1953.25, 1953.55, 1956.25, 1956.85, 1956.70, 1956.10, 1953.40, 1953.10]
    out = site.series("radar.ZU", T0, MIN, values)
    assert steps(out) == [
        ("raised", "NONE", "IV_BLUE"),
        ("escalated", "IV_BLUE", "III_YELLOW"),
        ("escalated", "III_YELLOW", "II_ORANGE"),
        ("escalated", "II_ORANGE", "I_RED"),
        ("de_escalated", "I_RED", "II_ORANGE"),
        ("de_escalated", "II_ORANGE", "III_YELLOW"),
        ("de_escalated", "III_YELLOW", "IV_BLUE"),
        ("cleared", "IV_BLUE", "NONE"),
    ]
    assert [t.ts_ms for t in out] == [T0 + i * MIN for i in range(1, 9)]
    raised = out[0]
    assert raised.rule == "res.zu" and raised.values == {0: 1953.25}
    assert "1953.25" in raised.message and "1953.2" in raised.message


def test_a_jump_over_several_levels_is_one_transition():
    site = zu()
    out = site.series("radar.ZU", T0, MIN, [1953.0, 1957.0, 1953.0])
    assert steps(out) == [("raised", "NONE", "I_RED"), ("cleared", "I_RED", "NONE")]


def test_hysteresis_prevents_chatter_around_the_threshold():
    wobble = [1953.30, 1953.51, 1953.49, 1953.52, 1953.46, 1953.50, 1953.47, 1953.53, 1953.44]
    site = zu()
    out = site.series("radar.ZU", T0, MIN, wobble)
    assert steps(out) == [
        ("raised", "NONE", "IV_BLUE"),
        ("escalated", "IV_BLUE", "III_YELLOW"),  # at 1953.51
        ("de_escalated", "III_YELLOW", "IV_BLUE"),  # only at 1953.44 < clear 1953.45
    ]
    assert out[-1].ts_ms == T0 + 8 * MIN
    # the same wobble without hysteresis chatters: the test above can fail
    bare = zu(clear_margin="1953.50")
    chatter = bare.series("radar.ZU", T0, MIN, wobble)
    assert len(chatter) > 5


def test_on_delay_by_consecutive_readings_resets_when_interrupted():
    site = zu("on_delay_count = 2\n")
    ts = [T0 + i * MIN for i in range(5)]
    assert site.read("radar.ZU", ts[0], 1953.55) == []
    assert site.read("radar.ZU", ts[1], 1953.10) == []  # interrupted
    assert site.read("radar.ZU", ts[2], 1953.56) == []
    out = site.read("radar.ZU", ts[3], 1953.57)
    assert steps(out) == [("raised", "NONE", "III_YELLOW")]
    assert out[0].ts_ms == ts[3]


def test_on_delay_by_time_is_confirmed_by_a_reading_or_by_tick():
    site = zu("on_delay_s = 120\n")
    assert site.read("radar.ZU", T0, 1953.55) == []
    assert site.read("radar.ZU", T0 + 60 * SEC, 1953.56) == []
    assert site.engine.tick(T0 + 119 * SEC) == []
    out = site.engine.tick(T0 + 120 * SEC)
    assert steps(out) == [("raised", "NONE", "III_YELLOW")] and out[0].ts_ms == T0 + 120 * SEC

    other = zu("on_delay_s = 120\n")
    other.read("radar.ZU", T0, 1953.55)
    other.read("radar.ZU", T0 + 60 * SEC, 1953.10)  # fell back: the delay starts again
    assert other.read("radar.ZU", T0 + 120 * SEC, 1953.55) == []
    assert other.read("radar.ZU", T0 + 180 * SEC, 1953.55) == []
    assert steps(other.read("radar.ZU", T0 + 240 * SEC, 1953.55)) == [("raised", "NONE", "III_YELLOW")]


def test_off_delay_holds_the_level_and_is_cancelled_by_a_return():
    site = zu("off_delay_s = 600\n")
    site.read("radar.ZU", T0, 1953.60)
    assert site.level("res.zu") == Level.III_YELLOW
    t1 = T0 + MIN
    assert site.read("radar.ZU", t1, 1953.00) == []
    assert site.read("radar.ZU", t1 + 5 * MIN, 1953.00) == []
    assert site.read("radar.ZU", t1 + 6 * MIN, 1953.48) == []  # back above clear: cancels
    assert site.read("radar.ZU", t1 + 7 * MIN, 1953.00) == []
    assert site.engine.tick(t1 + 16 * MIN) == []  # 9 min since the last drop
    out = site.engine.tick(t1 + 17 * MIN)
    assert steps(out) == [("cleared", "III_YELLOW", "NONE")]
    assert out[0].ts_ms == t1 + 17 * MIN


def test_off_delay_by_count():
    site = zu("off_delay_count = 3\n")
    site.read("radar.ZU", T0, 1953.60)
    assert site.series("radar.ZU", T0 + MIN, MIN, [1953.0, 1953.0]) == []
    assert steps(site.read("radar.ZU", T0 + 3 * MIN, 1953.0)) == [("cleared", "III_YELLOW", "NONE")]


def test_stepwise_de_escalation_with_off_delay():
    site = zu("off_delay_s = 120\n")
    site.read("radar.ZU", T0, 1956.90)
    assert site.level("res.zu") == Level.I_RED
    out = site.series("radar.ZU", T0 + MIN, MIN, [1956.30] * 4)
    assert steps(out) == [("de_escalated", "I_RED", "II_ORANGE")]
    assert out[0].ts_ms == T0 + 3 * MIN


def test_decimal_readings_compare_exactly():
    site = zu()
    assert steps(site.read("radar.ZU", T0, Decimal("1953.49"))) == [("raised", "NONE", "IV_BLUE")]
    out = site.read("radar.ZU", T0 + MIN, Decimal("1953.50"))
    assert steps(out) == [("escalated", "IV_BLUE", "III_YELLOW")]
    assert out[0].values == {0: Decimal("1953.50")}  # the reading's own value, not a float


# KM-CHEM-01 O₂ channel: deficiency 19.5 %VOL (a low threshold) and over-oxygen 23.5 %VOL on one point.
OXYGEN = """
[[rules]]
kind = "threshold"
id = "chem.o2.low"
point = "o2.conc"
direction = "low"
levels = [ { level = "III_YELLOW", set = 19.5, clear = 19.8 } ]

[[rules]]
kind = "threshold"
id = "chem.o2.high"
point = "o2.conc"
levels = [ { level = "III_YELLOW", set = 23.5, clear = 23.2 } ]
"""


def test_low_threshold_oxygen_deficiency():
    site = Site(OXYGEN)
    out = site.series("o2.conc", T0, SEC, [20.9, 19.6, 19.5, 19.7, 19.8, 19.9, 20.9, 23.6])
    assert [(t.rule, str(t.kind), t.ts_ms - T0) for t in out] == [
        ("chem.o2.low", "raised", 2 * SEC),  # 19.5 ≤ 19.5
        ("chem.o2.low", "cleared", 5 * SEC),  # 19.9 > clear 19.8 (19.7 and 19.8 hold)
        ("chem.o2.high", "raised", 7 * SEC),
    ]


GAS = """
[[rules]]
kind = "threshold"
id = "chem.gas1"
point = "ai.ch0"
levels = [ { level = "III_YELLOW", set = 25.0, clear = 23.0 }, { level = "II_ORANGE", set = 50.0, clear = 48.0 } ]
out_of_range = "raise_only"
"""


def test_over_range_gas_reading_raises_but_under_range_is_a_fault():
    site = Site(GAS)
    site.read("ai.ch0", T0, 30.0)
    out = site.read("ai.ch0", T0 + SEC, 104.0, Quality.OUT_OF_RANGE)  # 20–21 mA: treat as ≥ 二级
    assert steps(out) == [("escalated", "III_YELLOW", "II_ORANGE")]
    out = site.read("ai.ch0", T0 + 2 * SEC, -3.0, Quality.OUT_OF_RANGE)  # < 3.6 mA: a broken loop
    assert [t.kind for t in out] == [TransitionKind.FAULT]
    assert site.level("chem.gas1") == Level.II_ORANGE  # a fault never lowers the alarm
    assert site.state("chem.gas1").fault


def test_an_under_range_reading_with_no_alarm_is_a_fault_not_all_clear():
    site = Site(GAS)
    out = site.read("ai.ch0", T0, -12.5, Quality.OUT_OF_RANGE)  # a 2 mA loop on a 4–20 mA %LEL head
    assert [t.kind for t in out] == [TransitionKind.FAULT]
    assert site.level("chem.gas1") == Level.NONE and site.state("chem.gas1").fault
