"""Accumulation rules: rain over 1 h / 3 h from a cumulative counter that resets and wraps (KM-RES-01)."""

from __future__ import annotations

import pytest

from gateway.rules import Level

from .test_rules_support import MIN, T0, Site, steps

RAIN = """
[[rules]]
kind = "accumulation"
id = "res.rain"
point = "rain.total"
{modulus}
levels = [
  {{ level = "IV_BLUE",    window_s = 3600,  set = 30.0, clear = 25.0 }},
  {{ level = "III_YELLOW", window_s = 10800, set = 50.0, clear = 45.0 }},
  {{ level = "II_ORANGE",  window_s = 10800, set = 100.0, clear = 90.0 }},
]
"""


def rain_site(modulus: str = "") -> Site:
    return Site(RAIN.format(modulus=modulus))


def rule(site: Site):
    return site.engine._rules["res.rain"]  # the rule object, to read its window totals


def test_one_hour_and_three_hour_windows_escalate_cma_style():
    site = rain_site()
    counter, t, out = 100.0, T0, []
    out += site.read("rain.total", t, counter)
    for minute in range(1, 181):  # 0.5 mm/min for three hours
        counter += 0.5
        t += MIN
        got = site.read("rain.total", t, counter)
        out += [(minute, x) for x in got]
    # 1 h reaches 30 mm after 60 minutes; 3 h reaches 50 mm after 100 minutes
    assert [(m, x.kind, x.new_level) for m, x in out] == [
        (60, "raised", Level.IV_BLUE),
        (100, "escalated", Level.III_YELLOW),
    ]
    assert rule(site).window_total(3600) == 30.0 and rule(site).window_total(10800) == 90.0
    for _ in range(10):  # a downpour: 3 mm/min
        counter += 3.0
        t += MIN
        out += [(0, x) for x in site.read("rain.total", t, counter)]
    assert site.level("res.rain") == Level.II_ORANGE
    for _ in range(240):  # dry: the windows empty out and the alarm clears
        t += MIN
        site.read("rain.total", t, counter)
    assert site.level("res.rain") == Level.NONE


def test_counter_reset_keeps_counting():
    site = rain_site()
    counter, t = 5000.0, T0
    site.read("rain.total", t, counter)
    for _ in range(40):  # 20 mm
        counter += 0.5
        t += MIN
        assert site.read("rain.total", t, counter) == []
    counter = 0.5  # the station cleared its counter (or lost power) and it counted 0.5 mm since
    t += MIN
    site.read("rain.total", t, counter)
    out = []
    for _ in range(19):
        counter += 0.5
        t += MIN
        out += site.read("rain.total", t, counter)
    assert rule(site).window_total(3600) == 30.0  # 20 + 0.5 + 9.5: nothing lost, nothing negative
    assert steps(out) == [("raised", "NONE", "IV_BLUE")]
    assert rule(site).counter_events == {"wrap": 0, "reset": 1}


def test_counter_wrap_with_modulus():
    # a u16 counter of 0.1 mm wraps at 6553.6 mm
    site = rain_site("modulus = 6553.6")
    counter, t, out = 6540.0, T0, []
    site.read("rain.total", t, counter)
    for _ in range(70):
        counter = round((counter + 0.5) % 6553.6, 1)
        t += MIN
        out += site.read("rain.total", t, counter)
    assert counter < 30  # it did wrap
    assert rule(site).counter_events == {"wrap": 1, "reset": 0}
    assert rule(site).window_total(3600) == pytest.approx(30.0)
    assert rule(site).window_total(10800) == pytest.approx(35.0)
    assert [x.new_level for x in out] == [Level.IV_BLUE]


def test_a_drop_that_is_not_a_wrap_is_a_reset_even_with_a_modulus():
    site = rain_site("modulus = 6553.6")
    site.read("rain.total", T0, 123.4)
    site.read("rain.total", T0 + MIN, 0.0)
    site.read("rain.total", T0 + 2 * MIN, 0.5)
    assert rule(site).counter_events == {"wrap": 0, "reset": 1}
    assert rule(site).window_total(3600) == pytest.approx(0.5)
    assert site.level("res.rain") == Level.NONE


def test_history_is_bounded():
    site = rain_site()
    for i in range(5000):  # ~3.5 days of minute readings
        site.read("rain.total", T0 + i * MIN, 100.0 + i * 0.01)
    r = rule(site)
    assert len(r._ts) < 1500  # 3 h window + compaction slack, not the whole history
    assert r.window_total(3600) == pytest.approx(0.6)
