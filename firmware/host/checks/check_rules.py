# Local threshold alarms under real MicroPython, with the gateway's threshold semantics
# (gateway/rules/threshold.py): set/clear ladder, on/off delays in readings, faults, raise_only,
# the output pin. Rules come from the real config parser; the pin is the simulated board's.
from check import eq, run, true
from simboard import SimPin
from yujing_node.config import Fields, Rule
from yujing_node.dec import parse
from yujing_node.records import DEC, FLOAT, Batch
from yujing_node.rules import STATE_BYTES, Alarms

INDEX = {"slope/crack": 0, "tank/o2": 1}
LADDER = [
    {"level": "IV_BLUE", "set": "10", "clear": "9.5"},
    {"level": "III_YELLOW", "set": "20", "clear": "19.5"},
    {"level": "II_ORANGE", "set": "30"},
    {"level": "I_RED", "set": "40", "clear": "39.5"},
]


def rule(**d):
    d.setdefault("point", "slope/crack")
    d.setdefault("levels", LADDER)
    return Rule(Fields("/config.json", "rules[0]", d), INDEX)


def feed(alarms, value, point=0, quality=0):
    """Feed a decimal string, a float, or None (a failed read)."""
    b = Batch(1)
    if value is None:
        b.add_none(point, 1, quality or 1)
    elif isinstance(value, float):
        b.add(point, 1, FLOAT, 0, value, quality)
    else:
        m, e = parse(value)
        b.add(point, 1, DEC, e, m, quality)
    return alarms.evaluate(b)


def test_condition_is_the_highest_rung_the_value_supports():
    a = Alarms([rule()])
    eq([feed(a, v) for v in ("5", "10", "19.99", "20", "45", "30.5", "29.9")], [0, 1, 1, 2, 4, 3, 2])


def test_clear_values_give_hysteresis_per_rung():
    a = Alarms([rule()])
    eq([feed(a, v) for v in ("10", "9.6", "9.5", "9.49", "10")], [1, 1, 1, 0, 1])
    eq([feed(a, v) for v in ("40", "39.5", "39.49", "29.99", "9.4")], [4, 4, 3, 2, 0])


def test_exact_decimal_comparison_no_float_rounding():
    a = Alarms([rule(levels=[{"level": "blue", "set": "1953.38"}])])
    eq(feed(a, "1953.37"), 0)
    eq(feed(a, "1953.380"), 1)


def test_on_delay_counts_consecutive_readings_per_level():
    # as gateway AlarmCore: each level needs on_delay_count readings at or above it in a row
    a = Alarms([rule(on_delay_count=2)])
    eq([feed(a, v) for v in ("50", "5", "50", "12", "50", "50")], [0, 0, 0, 1, 1, 4])


def test_off_delay_counts_readings_below():
    a = Alarms([rule(off_delay_count=3)])
    eq([feed(a, v) for v in ("25", "1", "1", "25", "1", "1", "1")], [2, 2, 2, 2, 2, 2, 0])


def test_low_direction_mirrors():
    a = Alarms(
        [
            rule(
                point="tank/o2",
                direction="low",
                levels=[{"level": "yellow", "set": "19.5", "clear": "19.6"}, {"level": "red", "set": "18"}],
            )
        ]
    )
    eq([feed(a, v, 1) for v in ("20.9", "19.5", "19.6", "19.61", "17.9", "18.1")], [0, 2, 2, 0, 4, 2])


def test_bad_readings_are_faults_that_keep_the_level_and_forget_delays():
    a = Alarms([rule(on_delay_count=2)])
    eq([feed(a, v) for v in ("15", "15")], [0, 1])
    eq(feed(a, None), 1)
    eq(a.fault[0], 1)
    eq(feed(a, "25"), 1)
    eq(a.fault[0], 0, "a good reading clears the fault")
    eq(feed(a, None), 1)
    eq(feed(a, "25"), 1, "the delay count restarted after the fault")
    eq(feed(a, "25"), 2)
    eq(feed(a, "99", quality=4), 2, "out_of_range is a fault by default")
    eq(a.fault[0], 1)


def test_raise_only_lets_an_over_range_reading_raise_but_not_lower():
    a = Alarms([rule(out_of_range="raise_only")])
    eq(feed(a, "99", quality=4), 4)
    eq(a.fault[0], 0)
    eq(feed(a, "1", quality=4), 4, "would lower: a fault instead")
    eq(a.fault[0], 1)


def test_float_values_compare_with_float_thresholds():
    a = Alarms([rule()])
    eq([feed(a, v) for v in (9.5, 10.0, 25.0, 19.0)], [0, 1, 2, 1])


def test_output_pin_follows_the_configured_level_without_network():
    pin = SimPin(4)
    a = Alarms([rule()], pin, 2)
    feed(a, "15")
    eq(pin.state, 0, "blue is below the output's level")
    feed(a, "21")
    eq(pin.state, 1)
    true(a.active)
    feed(a, "1")
    eq(pin.state, 0)


def test_state_survives_deep_sleep_including_delay_counts():
    a = Alarms([rule(on_delay_count=2), rule(point="tank/o2", direction="low", levels=[{"level": "red", "set": "18"}])])
    feed(a, "25")  # 1 of 2 readings towards yellow
    feed(a, "17", point=1)  # red at once
    buf = bytearray(2 * STATE_BYTES)
    a.save(buf)
    pin = SimPin(4)
    b = Alarms(
        [rule(on_delay_count=2), rule(point="tank/o2", direction="low", levels=[{"level": "red", "set": "18"}])], pin
    )
    b.restore(buf)
    eq(list(b.level), [0, 4])
    eq(pin.state, 1, "the output is driven from the restored levels")
    eq(feed(b, "25"), 4)
    eq(b.level[0], 2, "the second reading after the wake completes the on-delay")


run(globals())
