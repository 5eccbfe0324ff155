"""A poll is evaluated as a whole, and rate and accumulation windows survive a restart: a restart neither
clears nor re-raises a level by itself."""

from __future__ import annotations

import itertools

from gateway.model import Quality, Reading
from gateway.rules import Level, MemoryStateStore

from .test_rules_support import HOUR, MIN, T0, Site

GAS = """
[[rules]]
kind = "threshold"
id = "chem.lel1"
point = "lel1.conc"
levels = [ { level = "III_YELLOW", set = 25, clear = 23 }, { level = "II_ORANGE", set = 50, clear = 48 } ]
[rules.fault]
flags = ["lel1.fault"]
valid = ["lel1.ok"]
"""


def test_a_poll_is_evaluated_whole_whatever_the_order_of_its_readings() -> None:
    """Gas at 37, then 0 with the fault bit in the same poll: a fault, never a clear, in every order."""
    for order in itertools.permutations(["conc", "fault", "ok"]):
        site = Site(GAS, points=["lel1.conc", "lel1.fault", "lel1.ok"])
        engine = site.engine
        first = {"conc": 37, "fault": False, "ok": True}
        engine.evaluate_poll([Reading(site.index[f"lel1.{n}"], T0, first[n]) for n in order])
        assert engine.level("chem.lel1") == Level.III_YELLOW
        second = {"conc": 0, "fault": True, "ok": True}
        out = engine.evaluate_poll([Reading(site.index[f"lel1.{n}"], T0 + 1000, second[n]) for n in order])
        assert [t.kind for t in out] == ["fault"], (order, out)
        assert engine.level("chem.lel1") == Level.III_YELLOW
        third = {"conc": 40, "fault": False, "ok": True}  # the fault ends with real gas still there
        out = engine.evaluate_poll([Reading(site.index[f"lel1.{n}"], T0 + 2000, third[n]) for n in order])
        assert [t.kind for t in out] == ["fault_cleared"], (order, out)


RAIN = """
[[rules]]
kind = "accumulation"
id = "res.rain"
point = "rain.total"
levels = [
  { level = "IV_BLUE",    window_s = 600,   set = 10.0, clear = 8.0 },
  { level = "III_YELLOW", window_s = 3600,  set = 30.0, clear = 25.0 },
]
"""


def _rain_until_yellow(site: Site) -> tuple[int, float]:
    t, counter = T0, 100.0
    site.read("rain.total", t, counter)
    for _ in range(40):  # 1 mm/min for 40 minutes: 10 min → 10 mm (blue), 40 min → 40 mm (yellow)
        t += MIN
        counter += 1.0
        site.read("rain.total", t, counter)
    assert site.level("res.rain") == Level.III_YELLOW
    return t, counter


def test_a_restart_keeps_the_rain_windows_so_the_level_holds() -> None:
    store = MemoryStateStore()
    site = Site(RAIN, store=store)
    t, counter = _rain_until_yellow(site)
    site.engine.save()  # as the gateway does at a stop (and once a minute while it runs)
    again = Site(RAIN, store=store)
    assert again.level("res.rain") == Level.III_YELLOW
    out = again.read("rain.total", t + 30_000, counter + 0.5)  # first reading after the restart: still raining
    assert out == [] and again.level("res.rain") == Level.III_YELLOW
    rule = again.engine._rules["res.rain"]
    assert rule.window_total(600) >= 10.0 and rule.window_total(3600) >= 40.0


def test_without_saved_windows_a_partial_sum_never_clears_a_level() -> None:
    """The old failure: after a restart the first reading cleared the level (totals 0). Even with no
    history at all (the state file lost), a window that does not yet span its length is only a lower
    bound: it may raise, never clear."""
    store = MemoryStateStore()
    site = Site(RAIN, store=store)
    t, counter = _rain_until_yellow(site)
    site.engine.save()
    state = store.load()
    del state["rules"]["res.rain"]["window"]  # a level restored without its history
    again = Site(RAIN, store=MemoryStateStore(state))
    for minute in range(1, 30):  # it keeps raining lightly: the lower bounds stay under the clear values
        out = again.read("rain.total", t + minute * MIN, counter + 0.2 * minute)
        assert not [x for x in out if x.kind in ("cleared", "de_escalated")], (minute, out)
    assert again.level("res.rain") == Level.III_YELLOW
    for minute in range(30, 130):  # dry for long enough that the windows span and say so
        again.read("rain.total", t + minute * MIN, counter + 6.0)
    assert again.level("res.rain") == Level.NONE


def test_rain_during_a_long_gap_is_booked_at_its_start_and_cannot_raise_a_short_window() -> None:
    """A gauge offline for two hours comes back 12 mm higher: nobody knows when that fell, so it does not
    count in the 10-minute window (no false blue), and the level may not clear on that lower bound."""
    site = Site(RAIN)
    t, counter = T0, 0.0
    for _ in range(30):
        t += MIN
        site.read("rain.total", t, counter)
    t += 2 * HOUR
    counter += 12.0
    out = site.read("rain.total", t, counter)
    assert out == [] and site.level("res.rain") == Level.NONE
    rule = site.engine._rules["res.rain"]
    assert rule.window_total(600) == 0.0 and rule.window_total(3600) == 0.0


RATE = """
[[rules]]
kind = "rate"
id = "slope.crack.rate"
point = "crack.opening"
window_s = 3600
per_s = 3600
levels = [ { level = "III_YELLOW", set = 2.0, clear = 1.5 } ]
"""


def test_a_restart_keeps_the_rate_window() -> None:
    store = MemoryStateStore()
    site = Site(RATE, store=store)
    t, x = T0, 10.0
    for _ in range(61):  # 3 mm/h for an hour
        site.read("crack.opening", t, x)
        t += MIN
        x += 0.05
    assert site.level("slope.crack.rate") == Level.III_YELLOW
    site.engine.save()
    again = Site(RATE, store=store)
    out = again.read("crack.opening", t, x)
    assert out == [] and again.level("slope.crack.rate") == Level.III_YELLOW
    assert again.engine._rules["slope.crack.rate"]._rate is not None  # known at the first reading, not after min_span


def test_saved_history_is_bounded() -> None:
    store = MemoryStateStore()
    site = Site(RAIN, store=store)
    t = T0
    for i in range(20_000):  # a reading every second for 5.5 hours
        site.read("rain.total", t + i * 1000, float(i // 100))
    site.engine.save()
    window = store.load()["rules"]["res.rain"]["window"]
    assert len(window["ts"]) <= 256 and len(window["v"]) == len(window["ts"])


def test_window_history_is_saved_at_most_once_a_minute() -> None:
    store = MemoryStateStore()
    site = Site(RAIN, store=store)
    t = T0
    for i in range(600):  # ten minutes of readings every second, with a tick after each
        site.read("rain.total", t + i * 1000, 100.0)
        site.engine.tick(t + i * 1000)
    assert 9 <= store.saves <= 11


def test_a_bad_saved_window_is_a_state_error_naming_the_key() -> None:
    import pytest

    from gateway.rules import RuleStateError

    state = {"version": 1, "rules": {"res.rain": {"level": 1, "active": 1, "acked": False, "since_ms": T0,
                                                  "window": {"ts": [2, 1], "v": [0.0, 1.0], "raw": 1.0, "total": 1.0, "first_ts": 1}}}}
    with pytest.raises(RuleStateError, match=r"res\.rain.*window\.ts"):
        Site(RAIN, store=MemoryStateStore(state))


def test_bad_quality_readings_do_not_touch_the_windows() -> None:
    site = Site(RAIN)
    site.read("rain.total", T0, 5.0)
    site.read("rain.total", T0 + MIN, None, Quality.TIMEOUT)
    assert site.engine._rules["res.rain"].window_total(600) == 0.0
