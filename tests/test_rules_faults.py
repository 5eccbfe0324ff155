"""Faults: bad quality, stale input, implausible steps. A fault keeps the level: never a false red,
never a cleared alarm (KM-RES-01 scenario 3: a radar glitch spike must raise a fault, not red)."""

from __future__ import annotations

import math

from gateway.model import Quality
from gateway.rules import Level, TransitionKind

from .test_rules_support import MIN, SEC, T0, Site, brief

LEVEL = """
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
[rules.fault]
interval_s = 60
stale_intervals = 3
max_step = 0.5
max_step_per_s = 60
min = 1941.0
max = 1963.0

[[rules]]
kind = "rate"
id = "res.zu.rise"
point = "radar.ZU"
window_s = 3600
per_s = 3600
levels = [ { level = "III_YELLOW", set = 0.10 }, { level = "II_ORANGE", set = 0.30 } ]
[rules.fault]
max_step = 0.5
max_step_per_s = 60
"""


def test_radar_glitch_spike_is_a_fault_not_red():
    site = Site(LEVEL)
    out = site.series("radar.ZU", T0, MIN, [1953.38 + i * 0.001 for i in range(40)])
    assert brief(out) == [("raised", "res.zu", "IV_BLUE")]
    t = T0 + 40 * MIN
    out = site.read("radar.ZU", t, 1962.90)  # gap reads 0.1 m for one poll: a 9.5 m "jump" in a minute
    assert brief(out) == [("fault", "res.zu", "IV_BLUE"), ("fault", "res.zu.rise", "NONE")]
    assert "implausible step" in out[0].message
    assert site.level("res.zu") == Level.IV_BLUE and site.level("res.zu.rise") == Level.NONE
    out = site.read("radar.ZU", t + MIN, 1953.42)
    assert brief(out) == [("fault_cleared", "res.zu", "IV_BLUE"), ("fault_cleared", "res.zu.rise", "NONE")]
    # the spike never entered the rate history either
    assert site.series("radar.ZU", t + 2 * MIN, MIN, [1953.42] * 5) == []


def test_a_persistent_offset_stays_a_fault_until_plausible_at_0_5_m_per_min():
    site = Site(LEVEL)
    site.read("radar.ZU", T0, 1953.40)
    assert [t.kind for t in site.read("radar.ZU", T0 + MIN, 1954.10)][:1] == [TransitionKind.FAULT]
    # 0.7 m above the last accepted reading: plausible only once 0.7/0.5 min have passed since it
    assert site.read("radar.ZU", T0 + 80 * SEC, 1954.10) == []
    out = site.read("radar.ZU", T0 + 90 * SEC, 1954.10)
    assert brief(out) == [
        ("fault_cleared", "res.zu", "IV_BLUE"),
        ("escalated", "res.zu", "III_YELLOW"),  # 1954.10 is now believed
        ("fault_cleared", "res.zu.rise", "NONE"),
    ]


def test_a_fault_never_clears_an_existing_alarm():
    site = Site(LEVEL)
    site.series("radar.ZU", T0, MIN, [1953.40, 1953.60, 1953.70])
    assert site.level("res.zu") == Level.III_YELLOW
    out = site.read("radar.ZU", T0 + 3 * MIN, 1941.50)  # a big drop: a glitch, not a cleared alarm
    assert [t.kind for t in out] == [TransitionKind.FAULT, TransitionKind.FAULT]
    out = site.read("radar.ZU", T0 + 4 * MIN, None, Quality.TIMEOUT)
    assert out == []  # already in fault
    out = site.read("radar.ZU", T0 + 5 * MIN, 1940.0)  # outside the plausible range [1941, 1963]
    assert out == []
    assert site.engine.tick(T0 + 60 * MIN) == []
    state = site.state("res.zu")
    assert state.level == Level.III_YELLOW and state.fault
    assert state.fault_since_ms == T0 + 3 * MIN
    out = site.read("radar.ZU", T0 + 61 * MIN, 1953.70)
    assert brief(out)[0] == ("fault_cleared", "res.zu", "III_YELLOW")
    assert site.level("res.zu") == Level.III_YELLOW


def test_bad_quality_is_a_fault_and_the_next_good_reading_clears_it():
    site = Site(LEVEL)
    site.read("radar.ZU", T0, 1953.60)
    out = site.read("radar.ZU", T0 + MIN, None, Quality.TIMEOUT)
    assert [(t.rule, t.kind, t.new_level) for t in out] == [
        ("res.zu", TransitionKind.FAULT, Level.III_YELLOW),
        ("res.zu.rise", TransitionKind.FAULT, Level.NONE),
    ]
    assert "timeout" in out[0].message
    assert out[0].old_level == out[0].new_level  # a fault is not a level change
    out = site.read("radar.ZU", T0 + 2 * MIN, 1953.10)
    assert brief(out) == [
        ("fault_cleared", "res.zu", "III_YELLOW"),
        ("cleared", "res.zu", "NONE"),
        ("fault_cleared", "res.zu.rise", "NONE"),
    ]


def test_modbus_exception_and_non_numbers_are_faults():
    site = Site(LEVEL)
    out = site.read("radar.ZU", T0, None, 0x82)
    assert "modbus_exception_02" in out[0].message
    site2 = Site(LEVEL)
    out = site2.read("radar.ZU", T0, math.nan)
    assert out[0].kind == TransitionKind.FAULT and "not a finite number" in out[0].message


def test_stale_input_after_three_missed_intervals():
    site = Site(LEVEL)
    site.read("radar.ZU", T0, 1953.60)
    assert site.engine.tick(T0 + 180 * SEC) == []
    out = site.engine.tick(T0 + 181 * SEC)
    assert brief(out) == [("fault", "res.zu", "III_YELLOW")]  # the rate rule has no interval_s
    assert "stale" in out[0].message
    assert site.engine.tick(T0 + 300 * SEC) == []  # reported once
    out = site.read("radar.ZU", T0 + 301 * SEC, 1953.61)
    assert brief(out) == [("fault_cleared", "res.zu", "III_YELLOW")]


def test_a_point_that_never_reports_goes_stale_from_the_first_tick():
    site = Site(LEVEL)
    assert site.engine.tick(T0) == []
    assert brief(site.engine.tick(T0 + 181 * SEC)) == [("fault", "res.zu", "NONE")]


def test_fault_forgets_a_half_elapsed_on_delay():
    site = Site(LEVEL.replace("[rules.fault]\ninterval_s", 'on_delay_count = 2\n[rules.fault]\ninterval_s', 1))
    assert site.read("radar.ZU", T0, 1953.60) == []
    site.read("radar.ZU", T0 + MIN, None, Quality.FRAMING)
    out = site.read("radar.ZU", T0 + 2 * MIN, 1953.60)
    assert brief(out) == [("fault_cleared", "res.zu", "NONE"), ("fault_cleared", "res.zu.rise", "NONE")]
    assert brief(site.read("radar.ZU", T0 + 3 * MIN, 1953.60)) == [("raised", "res.zu", "III_YELLOW")]


def test_duplicate_and_out_of_order_readings_are_ignored():
    site = Site(LEVEL.replace("[rules.fault]\ninterval_s", 'on_delay_count = 2\n[rules.fault]\ninterval_s', 1))
    site.read("radar.ZU", T0, 1953.60)
    assert site.read("radar.ZU", T0, 1953.60) == []  # same timestamp: not a second confirmation
    assert site.read("radar.ZU", T0 - MIN, 1953.60) == []
    assert site.level("res.zu") == Level.NONE
    assert brief(site.read("radar.ZU", T0 + MIN, 1953.60)) == [("raised", "res.zu", "III_YELLOW")]


# KM-CHEM-01 H₂S detector (generic module map): status word bits read as their own points.
H2S = """
[[rules]]
kind = "threshold"
id = "chem.h2s"
point = "h2s.conc"
levels = [ { level = "III_YELLOW", set = 7.0, clear = 6.0 }, { level = "II_ORANGE", set = 14.0, clear = 13.0 } ]
[rules.fault]
flags = ["h2s.sensor_lost"]
valid = ["h2s.status_valid"]
"""


def h2s_poll(site: Site, ts: int, conc, *, lost: bool = False, valid: bool = True) -> list:
    # the status word comes first in register order, so the poll delivers it first
    return (
        site.read("h2s.status_valid", ts, valid)
        + site.read("h2s.sensor_lost", ts, lost)
        + site.read("h2s.conc", ts, conc)
    )


def test_sensor_lost_flag_is_a_fault_not_0_ppm():
    site = Site(H2S)
    assert brief(h2s_poll(site, T0, 15)) == [("raised", "chem.h2s", "II_ORANGE")]
    out = h2s_poll(site, T0 + SEC, 0, lost=True)  # 80 20 00 00: sensor lost, "0 ppm"
    assert brief(out) == [("fault", "chem.h2s", "II_ORANGE")]
    assert "sensor_lost" in out[0].message
    assert site.level("chem.h2s") == Level.II_ORANGE  # never cleared by a dead sensor
    assert h2s_poll(site, T0 + 2 * SEC, 0, lost=True) == []
    out = h2s_poll(site, T0 + 3 * SEC, 0)
    assert brief(out) == [("fault_cleared", "chem.h2s", "II_ORANGE"), ("cleared", "chem.h2s", "NONE")]


def test_status_word_not_valid_and_bad_status_reads_are_faults():
    site = Site(H2S)
    h2s_poll(site, T0, 9)
    out = h2s_poll(site, T0 + SEC, 0, valid=False)
    assert brief(out) == [("fault", "chem.h2s", "III_YELLOW")] and "status_valid false" in out[0].message
    h2s_poll(site, T0 + 2 * SEC, 9)
    assert not site.state("chem.h2s").fault
    out = site.read("h2s.sensor_lost", T0 + 3 * SEC, None, Quality.FRAMING)
    assert brief(out) == [("fault", "chem.h2s", "III_YELLOW")]
    # the value's own fault and the status fault are separate: both must clear
    site.read("h2s.conc", T0 + 3 * SEC, None, Quality.FRAMING)
    assert site.read("h2s.sensor_lost", T0 + 4 * SEC, False) == []  # the value is still bad
    out = site.read("h2s.conc", T0 + 4 * SEC, 9)
    assert brief(out) == [("fault_cleared", "chem.h2s", "III_YELLOW")]


def test_status_points_are_indexed_and_validated():
    site = Site(H2S, points=["other"])
    assert site.engine.points == {site.index["h2s.conc"], site.index["h2s.sensor_lost"], site.index["h2s.status_valid"]}
