"""Rate rules: a rising reservoir (m/h) and a creeping crack meter (mm/day)."""

from __future__ import annotations

from gateway.rules import Level

from .test_rules_support import DAY, HOUR, MIN, T0, Site, steps

RISE = """
[[rules]]
kind = "rate"
id = "res.zu.rise"
point = "radar.ZU"
window_s = 3600
per_s = 3600
direction = "rise"
levels = [
  { level = "III_YELLOW", set = 0.10, clear = 0.08 },
  { level = "II_ORANGE",  set = 0.30, clear = 0.25 },
]
on_delay_count = 2
"""


def test_rising_reservoir_yellow_at_0_10_m_per_h_then_orange_then_back():
    site = Site(RISE)
    t = T0
    out = []
    level = 1953.000
    for _ in range(61):  # an hour flat
        out += site.read("radar.ZU", t, round(level, 3))
        t += MIN
    rise_start = t
    for _ in range(90):  # 0.12 m/h
        level += 0.002
        out += site.read("radar.ZU", t, round(level, 3))
        t += MIN
    assert steps(out) == [("raised", "NONE", "III_YELLOW")]
    # the 1 h rate reaches 0.10 m/h 50 min into the rise; 2-sample confirmation adds one reading
    assert rise_start + 49 * MIN <= out[0].ts_ms <= rise_start + 52 * MIN
    assert "+0.1" in out[0].message and "/h" in out[0].message
    for _ in range(60):  # 0.40 m/h
        level += 0.4 / 60
        out += site.read("radar.ZU", t, round(level, 3))
        t += MIN
    for _ in range(120):  # stops rising
        out += site.read("radar.ZU", t, round(level, 3))
        t += MIN
    assert steps(out) == [
        ("raised", "NONE", "III_YELLOW"),
        ("escalated", "III_YELLOW", "II_ORANGE"),
        ("de_escalated", "II_ORANGE", "III_YELLOW"),
        ("cleared", "III_YELLOW", "NONE"),
    ]


def test_no_rate_until_the_readings_span_min_span():
    site = Site(RISE)
    # a restart mid-flood: two readings a minute apart would say 18 m/h
    assert site.read("radar.ZU", T0, 1953.00) == []
    assert site.read("radar.ZU", T0 + MIN, 1953.30) == []
    assert site.read("radar.ZU", T0 + 2 * MIN, 1953.30) == []
    assert site.level("res.zu.rise") == Level.NONE


def test_fall_direction_detects_rapid_drawdown_only():
    site = Site(RISE.replace('direction = "rise"', 'direction = "fall"'))
    rising = [1953.0 + 0.01 * i for i in range(61)]  # 0.6 m/h up: not a drawdown
    assert site.series("radar.ZU", T0, MIN, rising) == []
    falling = [rising[-1] - 0.01 * i for i in range(1, 121)]
    out = site.series("radar.ZU", T0 + 61 * MIN, MIN, falling)
    assert [s[2] for s in steps(out)][:2] == ["III_YELLOW", "II_ORANGE"]


CRACK = """
[[rules]]
kind = "rate"
id = "slope.crack.rate"
point = "crack.L1"
window_s = 86400
per_s = 86400
min_span_s = 43200
levels = [
  { level = "III_YELLOW", set = 2.0, clear = 1.5 },
  { level = "II_ORANGE",  set = 10.0, clear = 8.0 },
]
"""


def test_creeping_crack_meter_mm_per_day():
    site = Site(CRACK)
    step = 10 * MIN
    per_step = step / DAY
    t, opening, out = T0, 12.86, []

    def run(days: float, mm_per_day: float) -> None:
        nonlocal t, opening, out
        for _ in range(round(days * DAY / step)):
            opening += mm_per_day * per_step
            out += site.read("crack.L1", t, round(opening, 2))
            t += step

    run(2, 1.0)  # steady creep: below every level
    assert out == []
    phase2 = t
    run(2, 3.0)  # accelerating
    assert steps(out) == [("raised", "NONE", "III_YELLOW")]
    # the 24 h rate crosses 2 mm/day when half the window is in the faster phase
    assert phase2 + 11 * HOUR <= out[0].ts_ms <= phase2 + 13 * HOUR
    run(1, 12.0)
    run(2, 0.0)  # stops
    assert steps(out) == [
        ("raised", "NONE", "III_YELLOW"),
        ("escalated", "III_YELLOW", "II_ORANGE"),
        ("de_escalated", "II_ORANGE", "III_YELLOW"),
        ("cleared", "III_YELLOW", "NONE"),
    ]
