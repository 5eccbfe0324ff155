"""Rule configuration: every error names the field path; every kind's SAMPLE loads and builds."""

from __future__ import annotations

import inspect
import tomllib

import pytest

from gateway.rules import AlarmEngine, RuleConfigError, kinds, parse_rules

GOOD = {
    "kind": "threshold",
    "id": "a",
    "point": "p",
    "levels": [{"level": "IV_BLUE", "set": 1.0}],
}


def rules_with(bad: dict, at: int = 3) -> list[dict]:
    rules = [dict(GOOD, id=f"r{i}") for i in range(at)]
    rules.append(bad)
    return rules


def error_of(raw: list[dict]) -> RuleConfigError:
    with pytest.raises(RuleConfigError) as info:
        parse_rules(raw)
    return info.value


def threshold(**changes) -> dict:
    base = {
        "kind": "threshold",
        "id": "res.zu",
        "point": "radar.ZU",
        "levels": [
            {"level": "IV_BLUE", "set": 1953.20, "clear": 1953.15},
            {"level": "III_YELLOW", "set": 1953.50, "clear": 1953.45},
        ],
    }
    base.update(changes)
    return base


@pytest.mark.parametrize(
    "bad, path, words",
    [
        (threshold(levels=[{"level": "IV_BLUE", "set": 1953.2}, {"level": "III_YELLOW", "set": 1953.5, "clear": 1953.6}]),
         "rules[3].levels[1].clear", "≤ set"),
        (threshold(levels=[{"level": "IV_BLUE", "set": 1953.2}, {"level": "III_YELLOW", "set": 1953.5, "clera": 1.0}]),
         "rules[3].levels[1].clera", "unknown key"),
        (threshold(levels=[{"level": "III_YELLOW", "set": 1953.5}, {"level": "IV_BLUE", "set": 1953.6}]),
         "rules[3].levels[1].level", "higher than"),
        (threshold(levels=[{"level": "IV_BLUE", "set": 1953.5}, {"level": "III_YELLOW", "set": 1953.2}]),
         "rules[3].levels[1].set", "above"),
        (threshold(direction="low", levels=[{"level": "III_YELLOW", "set": 19.5, "clear": 19.0}]),
         "rules[3].levels[0].clear", "≥ set"),
        (threshold(levels=[{"level": "PURPLE", "set": 1.0}]), "rules[3].levels[0].level", "unknown level"),
        (threshold(levels=[{"level": "NONE", "set": 1.0}]), "rules[3].levels[0].level", "NONE"),
        (threshold(levels=[{"level": "IV_BLUE", "set": "high"}]), "rules[3].levels[0].set", "number"),
        (threshold(levels=[]), "rules[3].levels", "at least one"),
        (threshold(direction="up"), "rules[3].direction", "high, low"),
        (threshold(latch="yes"), "rules[3].latch", "true or false"),
        (threshold(on_delay_s=60, on_delay_count=2), "rules[3].on_delay_count", "not both"),
        (threshold(off_delay_count=0), "rules[3].off_delay_count", "≥ 1"),
        (threshold(on_delay_s=-1), "rules[3].on_delay_s", "≥ 0"),
        (threshold(id="bad id!"), "rules[3].id", "letters"),
        (threshold(treshold=1), "rules[3].treshold", "unknown key"),
        ({k: v for k, v in threshold().items() if k != "point"}, "rules[3].point", "missing"),
        (threshold(kind="thresold"), "rules[3].kind", "known kinds: accumulation, combination, rate, threshold"),
        (threshold(window={"start": "06-01", "end": "10-31"}), "rules[3].window.utc_offset", "missing"),
        (threshold(window={"start": "06-31", "end": "10-31", "utc_offset": "+08:00"}), "rules[3].window.start", "not a day"),
        (threshold(window={"start": "June 1", "end": "10-31", "utc_offset": "+08:00"}), "rules[3].window.start", "MM-DD"),
        (threshold(window={"start": "06-01", "end": "10-31", "utc_offset": "8"}), "rules[3].window.utc_offset", "+HH:MM"),
        (threshold(fault={"max_step_per_s": 60}), "rules[3].fault.max_step_per_s", "needs max_step"),
        (threshold(fault={"interval_s": 0}), "rules[3].fault.interval_s", "> 0"),
        (threshold(fault={"min": 5, "max": 1}), "rules[3].fault.max", "> min"),
        (threshold(fault={"stale": 3}), "rules[3].fault.stale", "unknown key"),
        (threshold(fault={"flags": ["radar.ZU"]}), "rules[3].fault.flags[0]", "own point"),
        (threshold(fault={"flags": ["a.lost"], "valid": ["a.lost"]}), "rules[3].fault.valid[0]", "twice"),
        (threshold(fault={"flags": "a.lost"}), "rules[3].fault.flags", "list of strings"),
        (threshold(out_of_range="alarm"), "rules[3].out_of_range", "raise_only"),
        ({"kind": "rate", "id": "r", "point": "p", "per_s": 3600, "levels": [{"level": "III_YELLOW", "set": 0.1}]},
         "rules[3].window_s", "missing"),
        ({"kind": "rate", "id": "r", "point": "p", "window_s": 3600, "per_s": 3600, "min_span_s": 7200,
          "levels": [{"level": "III_YELLOW", "set": 0.1}]}, "rules[3].min_span_s", "≤ window_s"),
        ({"kind": "rate", "id": "r", "point": "p", "window_s": 3600, "per_s": 3600,
          "levels": [{"level": "III_YELLOW", "set": -0.1}]}, "rules[3].levels[0].set", "> 0"),
        ({"kind": "accumulation", "id": "r", "point": "p", "levels": [{"level": "IV_BLUE", "set": 30.0}]},
         "rules[3].levels[0].window_s", "missing"),
        ({"kind": "accumulation", "id": "r", "point": "p", "modulus": 0,
          "levels": [{"level": "IV_BLUE", "set": 30.0, "window_s": 3600}]}, "rules[3].modulus", "> 0"),
        ({"kind": "accumulation", "id": "r", "point": "p", "levels": [
            {"level": "IV_BLUE", "set": 30.0, "window_s": 3600},
            {"level": "III_YELLOW", "set": 20.0, "window_s": 3600}]}, "rules[3].levels[1].set", "above"),
    ],
)
def test_errors_name_the_field(bad, path, words):
    err = error_of(rules_with(bad))
    assert err.path == path
    assert path in str(err) and words in str(err)


def combo(**changes) -> dict:
    base = {"kind": "combination", "id": "vote", "mode": "at_least", "count": 2,
            "rules": ["r0", "r1", "r2"], "min_level": "II_ORANGE", "result_level": "I_RED"}
    base.update(changes)
    return base


@pytest.mark.parametrize(
    "bad, path, words",
    [
        (combo(rules=["r0", "r9"]), "rules[3].rules[1]", "no rule with id 'r9'"),
        (combo(rules=["r0", "r0"], count=1), "rules[3].rules[1]", "twice"),
        (combo(count=4), "rules[3].count", "more than"),
        (combo(mode="any"), "rules[3].count", "at_least"),
        (combo(mode="most"), "rules[3].mode", "any, all, at_least"),
        (combo(raise_rule="r0"), "rules[3].result_level", "exactly one"),
        (combo(result_level=None), "rules[3].result_level", "exactly one"),
        (combo(on_delay_count=2), "rules[3].on_delay_count", "on_delay_s"),
        (combo(result_level="I_RED", fault={"interval_s": 1}), "rules[3].fault", "unknown key"),
        (combo(rules=["r0", "vote"], count=1), "rules[3].rules[1]", "itself"),
        (dict(GOOD, id="r1"), "rules[3].id", "duplicate"),
    ],
)
def test_combination_and_cross_rule_errors(bad, path, words):
    if "result_level" in bad and bad["result_level"] is None:
        del bad["result_level"]
    err = error_of(rules_with(bad))
    assert err.path == path and words in str(err)


def test_dependency_cycle_is_named():
    a = combo(id="a", rules=["b"], mode="any")
    b = combo(id="b", rules=["a"], mode="any")
    del a["count"], b["count"]
    raw = rules_with(a, at=1) + [b]
    err = error_of(raw)
    assert "cycle" in str(err) and "a → b → a" in str(err)


def test_unknown_point_is_an_error_naming_the_rule_field():
    configs = parse_rules([dict(GOOD, id="x"), dict(GOOD, id="y", point="nope")])
    with pytest.raises(RuleConfigError) as info:
        AlarmEngine(configs, {"p": 0}.__getitem__)
    assert info.value.path == "rules[1].point" and "'nope'" in str(info.value)
    configs = parse_rules([dict(GOOD, id="x", fault={"valid": ["p.ok", "p.bad"]})])
    with pytest.raises(RuleConfigError) as info:
        AlarmEngine(configs, {"p": 0, "p.ok": 1}.__getitem__)
    assert info.value.path == "rules[0].fault.valid[1]"


def test_rules_must_be_a_list_of_tables():
    assert error_of({"kind": "threshold"}).path == "rules"  # type: ignore[arg-type]
    assert error_of(["threshold"]).path == "rules[0]"


def test_errors_are_value_errors():
    assert issubclass(RuleConfigError, ValueError)


def test_every_kind_module_declares_kind_config_sample_and_one_rule_class():
    found = kinds()
    assert set(found) == {"threshold", "rate", "accumulation", "combination"}
    for name, kind in found.items():
        assert kind.module.KIND == name
        assert kind.cls.__name__.endswith("Rule") and kind.cls.__module__ == kind.module.__name__
        assert inspect.isclass(kind.config) and kind.config.__dataclass_params__.frozen
        assert kind.sample.strip().startswith("[[rules]]")


@pytest.mark.parametrize("name", ["threshold", "rate", "accumulation", "combination"])
def test_every_sample_loads_shows_every_option_and_builds(name):
    kind = kinds()[name]
    raw = tomllib.loads(kind.sample)["rules"]
    configs = parse_rules(raw)
    points: dict[str, int] = {}
    engine = AlarmEngine(configs, lambda n: points.setdefault(n, len(points)))
    assert engine.rule_ids == tuple(c.id for c in configs)
    # every option of the kind appears in its sample (set or commented out)
    mine = [c for c in configs if type(c) is kind.config][0]
    for field in mine.__dataclass_fields__:
        if field in ("path", "fault"):
            continue
        if name == "combination" and field.endswith("_delay_count"):
            continue  # rejected on a combination: its delays are by time only
        assert field in kind.sample, f"{name}.SAMPLE does not show {field!r}"
    if name != "combination":
        for option in ("interval_s", "stale_intervals", "max_step", "max_step_per_s", "min =", "max =", "flags", "valid"):
            assert option in kind.sample, f"{name}.SAMPLE does not show fault option {option!r}"
