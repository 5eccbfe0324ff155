"""Combination rules: two-detector voting → red (KM-CHEM-01); rain and wet soil raise a level (KM-SLP-01)."""

from __future__ import annotations

from gateway.model import Quality
from gateway.rules import Level

from .test_rules_support import MIN, SEC, T0, Site, brief

DETECTOR = """
[[rules]]
kind = "threshold"
id = "chem.z1.gas{n}"
point = "ai.ch{n}"
levels = [ {{ level = "III_YELLOW", set = 25.0, clear = 23.0 }}, {{ level = "II_ORANGE", set = 50.0, clear = 48.0 }} ]
[rules.fault]
interval_s = 1
"""

VOTE = """
[[rules]]
kind = "combination"
id = "chem.z1.vote"
mode = "at_least"
count = 2
rules = ["chem.z1.gas0", "chem.z1.gas1", "chem.z1.gas2"]
min_level = "II_ORANGE"
result_level = "I_RED"
"""


def zone() -> Site:
    return Site("".join(DETECTOR.format(n=n) for n in range(3)) + VOTE)


def test_two_detectors_at_orange_vote_red():
    site = zone()
    assert brief(site.read("ai.ch0", T0, 55.0)) == [("raised", "chem.z1.gas0", "II_ORANGE")]
    assert brief(site.read("ai.ch1", T0 + SEC, 30.0)) == [("raised", "chem.z1.gas1", "III_YELLOW")]
    assert site.level("chem.z1.vote") == Level.NONE
    out = site.read("ai.ch1", T0 + 2 * SEC, 52.0)
    assert brief(out) == [
        ("escalated", "chem.z1.gas1", "II_ORANGE"),
        ("raised", "chem.z1.vote", "I_RED"),  # in the same call, right after the member
    ]
    assert out[1].values == {0: 55.0, 1: 52.0}  # the members' latest values (gas2 never read)
    assert "2 of 3" in out[1].message
    out = site.read("ai.ch0", T0 + 3 * SEC, 40.0)
    assert brief(out) == [("de_escalated", "chem.z1.gas0", "III_YELLOW"), ("cleared", "chem.z1.vote", "NONE")]


def test_a_faulted_detector_keeps_its_vote_and_a_single_detector_never_votes_red():
    site = zone()
    site.read("ai.ch0", T0, 55.0)
    site.read("ai.ch1", T0, 55.0)
    assert site.level("chem.z1.vote") == Level.I_RED
    out = site.read("ai.ch1", T0 + SEC, None, Quality.TIMEOUT)  # comms loss on detector 1
    assert brief(out) == [("fault", "chem.z1.gas1", "II_ORANGE")]
    assert site.level("chem.z1.vote") == Level.I_RED  # a fault never clears an alarm
    site.read("ai.ch0", T0 + 2 * SEC, 10.0)
    assert site.level("chem.z1.vote") == Level.NONE
    site.read("ai.ch2", T0 + 3 * SEC, 80.0)
    assert site.level("chem.z1.vote") == Level.I_RED  # gas1 (held orange) + gas2


RAIN_SOIL = """
[[rules]]
kind = "accumulation"
id = "slope.rain"
point = "rain.total"
levels = [
  { level = "IV_BLUE",    window_s = 3600, set = 35.0 },
  { level = "III_YELLOW", window_s = 3600, set = 45.0 },
  { level = "II_ORANGE",  window_s = 3600, set = 60.0 },
  { level = "I_RED",      window_s = 3600, set = 80.0 },
]

[[rules]]
kind = "accumulation"
id = "slope.rain.24h_wet"
description = "24 h rain ≥ 50 mm: input of the compound rule"
point = "rain.total"
levels = [ { level = "IV_BLUE", window_s = 86400, set = 50.0 } ]

[[rules]]
kind = "threshold"
id = "slope.soil.wet"
point = "soil.moisture"
levels = [ { level = "IV_BLUE", set = 40.0, clear = 38.0 } ]

[[rules]]
kind = "combination"
id = "slope.rain.compound"
mode = "all"
rules = ["slope.rain.24h_wet", "slope.soil.wet"]
min_level = "IV_BLUE"
raise_rule = "slope.rain"
"""


def test_wet_soil_and_24h_rain_raise_the_rain_level_by_one():
    site = Site(RAIN_SOIL)
    counter, t = 0.0, T0
    site.read("rain.total", t, counter)
    site.read("soil.moisture", t, 32.5)
    for _ in range(12 * 6):  # 12 h of light rain, 0.5 mm per 10 min: 36 mm
        counter += 0.5
        t += 10 * MIN
        site.read("rain.total", t, counter)
    assert site.level("slope.rain.compound") == Level.NONE
    out = []
    for _ in range(60):  # then 0.6 mm/min for an hour: 36 mm in 1 h → blue; 24 h total 72 mm
        counter += 0.6
        t += MIN
        out += site.read("rain.total", t, counter)
    assert site.level("slope.rain") == Level.IV_BLUE
    assert site.level("slope.rain.24h_wet") == Level.IV_BLUE
    assert site.level("slope.rain.compound") == Level.NONE  # soil still dry
    out = site.read("soil.moisture", t + SEC, 42.0)
    assert brief(out) == [
        ("raised", "slope.soil.wet", "IV_BLUE"),
        ("raised", "slope.rain.compound", "III_YELLOW"),  # blue raised one level
    ]
    t += SEC
    for _ in range(10):  # 2 mm/min: the 1 h total passes 45 mm → yellow, compound → orange
        counter += 2.0
        t += MIN
        out += site.read("rain.total", t, counter)
    assert site.level("slope.rain") == Level.III_YELLOW
    assert site.level("slope.rain.compound") == Level.II_ORANGE
    out = site.read("soil.moisture", t + SEC, 37.0)  # below clear 38: dries out
    assert ("cleared", "slope.rain.compound", "NONE") in brief(out)
    assert site.level("slope.rain") == Level.III_YELLOW


def test_combination_delay_is_by_time_and_confirmed_by_tick():
    text = "".join(DETECTOR.format(n=n) for n in range(3)) + VOTE + "on_delay_s = 5\n"
    site = Site(text)
    out = []
    for s in range(6):  # 1 s gas polls, a tick every second
        now = T0 + s * SEC
        for ch in range(3):
            out += site.read(f"ai.ch{ch}", now, 55.0 if ch < 2 else 0.0)
        if s == 0:
            assert site.level("chem.z1.vote") == Level.NONE
        out += site.engine.tick(now)
    assert brief(out) == [
        ("raised", "chem.z1.gas0", "II_ORANGE"),
        ("raised", "chem.z1.gas1", "II_ORANGE"),
        ("raised", "chem.z1.vote", "I_RED"),
    ]
    assert out[-1].ts_ms == T0 + 5 * SEC
