"""Seasonal windows: the 汛限 rule is active only in the flood season (Jun 1 – Oct 31, Kunming time)."""

from __future__ import annotations

import pytest

from gateway.rules import Level

from .test_rules_support import MIN, Site, brief, local_ms

FLOOD = """
[[rules]]
kind = "threshold"
id = "res.zu.flood_season"
point = "radar.ZU"
levels = [
  { level = "IV_BLUE",    set = 1953.20, clear = 1953.15 },
  { level = "III_YELLOW", set = 1953.50, clear = 1953.45 },
]
window = { start = "06-01", end = "10-31", utc_offset = "+08:00" }

[[rules]]
kind = "threshold"
id = "res.zu"
point = "radar.ZU"
levels = [
  { level = "II_ORANGE", set = 1956.20, clear = 1956.15 },
  { level = "I_RED",     set = 1956.80, clear = 1956.75 },
]
"""


def test_flood_season_rule_is_inactive_out_of_season_and_clears_when_the_season_ends():
    site = Site(FLOOD)
    before = local_ms(2025, 5, 31, 23, 59)
    assert site.read("radar.ZU", before, 1953.60) == []  # above 汛限, but not in the flood season
    assert site.state("res.zu.flood_season").in_window is False
    # 06-01 00:00 in Kunming is 05-31 16:00 UTC: the offset matters
    out = site.read("radar.ZU", local_ms(2025, 6, 1, 0, 0), 1953.60)
    assert brief(out) == [("raised", "res.zu.flood_season", "III_YELLOW")]
    assert site.read("radar.ZU", local_ms(2025, 10, 31, 23, 59), 1953.60) == []
    out = site.engine.tick(local_ms(2025, 11, 1, 0, 0))
    assert brief(out) == [("cleared", "res.zu.flood_season", "NONE")]
    assert out[0].ts_ms == local_ms(2025, 11, 1, 0, 0) and "window" in out[0].message
    assert site.read("radar.ZU", local_ms(2025, 11, 1, 0, 1), 1953.70) == []
    state = site.state("res.zu.flood_season")
    assert (state.level, state.in_window) == (Level.NONE, False)


def test_year_round_rule_on_the_same_point_still_alarms_out_of_season():
    site = Site(FLOOD)
    out = site.read("radar.ZU", local_ms(2025, 12, 20, 10, 0), 1956.30)
    assert brief(out) == [("raised", "res.zu", "II_ORANGE")]


def test_entering_the_season_evaluates_the_next_reading():
    site = Site(FLOOD)
    t = local_ms(2025, 5, 31, 23, 58)
    out = site.series("radar.ZU", t, MIN, [1953.30, 1953.30, 1953.30, 1953.30])
    assert brief(out) == [("raised", "res.zu.flood_season", "IV_BLUE")]
    assert out[0].ts_ms == local_ms(2025, 6, 1, 0, 0)


def test_window_over_new_year_and_with_times_of_day():
    site = Site(
        """
[[rules]]
kind = "threshold"
id = "dry_season"
point = "p"
levels = [ { level = "IV_BLUE", set = 1.0 } ]
window = { start = "11-01 06:00", end = "03-31", utc_offset = "+08:00" }
"""
    )
    window = site.configs[0].window
    assert window.contains(local_ms(2025, 12, 31, 23, 0))
    assert window.contains(local_ms(2026, 1, 15, 0, 0))
    assert window.contains(local_ms(2026, 3, 31, 23, 59))
    assert not window.contains(local_ms(2026, 4, 1, 0, 0))
    assert not window.contains(local_ms(2025, 11, 1, 5, 59))
    assert window.contains(local_ms(2025, 11, 1, 6, 0))


@pytest.mark.parametrize("offset, inside", [("+08:00", True), ("+00:00", False)])
def test_utc_offset_decides_the_local_date(offset, inside):
    site = Site(FLOOD.replace('"+08:00"', f'"{offset}"'))
    # 2025-06-01 04:00 in Kunming = 2025-05-31 20:00 UTC
    out = site.read("radar.ZU", local_ms(2025, 6, 1, 4, 0), 1953.60)
    assert (len(out) == 1) is inside


def test_a_latched_alarm_outlives_its_window_until_acknowledged():
    site = Site(FLOOD.replace('utc_offset = "+08:00" }', 'utc_offset = "+08:00" }\nlatch = true', 1))
    site.read("radar.ZU", local_ms(2025, 10, 31, 12, 0), 1953.60)
    assert site.engine.tick(local_ms(2025, 11, 1, 0, 0)) == []  # the condition ended with the season …
    state = site.state("res.zu.flood_season")
    assert (state.level, state.condition, state.latched) == (Level.III_YELLOW, Level.NONE, True)
    out = site.engine.acknowledge("res.zu.flood_season", "op", local_ms(2025, 11, 1, 8, 0))
    assert brief(out)[-1] == ("cleared", "res.zu.flood_season", "NONE")  # … the latch needs a person
