"""Action configuration: every error names the field path; every kind's SAMPLE loads and builds; the package
keeps the conventions (one file per kind, no clock reads, no asserts, no imports against the flow)."""

from __future__ import annotations

import ast
import inspect
import tomllib
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from gateway.actions import ActionConfigError, ActionController, kinds, parse_actions
from gateway.actions.registry import is_output
from gateway.clock import SystemClock
from gateway.rules.levels import Level, TransitionKind

ACTIONS_DIR = Path(__file__).resolve().parents[1] / "gateway" / "actions"
BUSES = {"rs485-a": "rtu", "rs485-b": "rtu", "midas": "tcp"}
RULES = ["crack.rate", "crack.total", "tilt.x", "rain.1h", "gas.lel1", "gas.lel2", "res.zu", "ai.lel1"]


def coil(**over: Any) -> dict[str, Any]:
    raw = {"kind": "coil", "name": "siren", "bus": "rs485-a", "unit": 10, "address": 0,
           "when": {"rules": ["crack.*"], "level": "II_ORANGE"}}
    raw.update(over)
    return raw


def error_of(raw: Any, **kwargs: Any) -> ActionConfigError:
    with pytest.raises(ActionConfigError) as e:
        parse_actions(raw, buses=kwargs.get("buses", BUSES), rule_ids=kwargs.get("rule_ids", RULES))
    return e.value


def test_a_site_example_parses() -> None:
    text = """
[[actions]]
kind = "coil"
name = "slope.siren"
when = { rules = ["crack.*", "tilt.*", "rain.*"], level = "orange" }
bus = "rs485-a"
unit = 10
address = 0

[[actions]]
kind = "coil"
name = "chem.fan"
when = { rules = ["gas.*"], level = "II_ORANGE" }
bus = "rs485-b"
unit = 30
address = 1
"""
    siren, fan = parse_actions(tomllib.loads(text)["actions"], buses=BUSES, rule_ids=RULES)
    assert siren.when.level == Level.II_ORANGE and fan.when.level == Level.II_ORANGE
    assert siren.when.matches("crack.rate") and siren.when.matches("tilt.x") and not siren.when.matches("gas.lel1")
    assert (fan.bus, fan.unit, fan.address, fan.invert) == ("rs485-b", 30, 1, False)
    assert siren.where("unit") == "actions[0].unit"


@pytest.mark.parametrize(("raw", "path", "reason"), [
    ([coil(colour="red")], "actions[0].colour", "unknown key"),
    ([coil(when={"rules": ["crack.*"], "level": "purple"})], "actions[0].when.level", "unknown level 'purple'"),
    ([coil(when={"rules": ["crack.*"], "level": "NONE"})], "actions[0].when.level", "NONE is not an alarm level"),
    ([coil(when={"rules": ["crack.*"]})], "actions[0].when.level", "missing required key"),
    ([coil(when={"rules": ["crack.*"], "level": "red", "for_s": 3})], "actions[0].when.for_s", "unknown key"),
    ([coil(when={"rules": [], "level": "red"})], "actions[0].when.rules", "must not be empty"),
    ([coil(when={"rules": ["crack.*", "gas.lel9"], "level": "red"})], "actions[0].when.rules[1]", "no rule id matches 'gas.lel9'"),
    ([coil(when="orange")], "actions[0].when", "expected a table"),
    ([coil(bus="rs485-c")], "actions[0].bus", "unknown bus 'rs485-c'; known buses: midas, rs485-a, rs485-b"),
    ([coil(unit=0)], "actions[0].unit", "must be in 1..247 on serial bus 'rs485-a'"),
    ([coil(unit=300)], "actions[0].unit", "must be in 0..255"),
    ([coil(address=-1)], "actions[0].address", "must be in 0..65535"),
    ([coil(address="0")], "actions[0].address", "expected an integer"),
    ([coil(invert="yes")], "actions[0].invert", "expected true or false"),
    ([coil(name="siren/1")], "actions[0].name", "must be 1–64 letters"),
    ([coil(), coil(address=1)], "actions[1].name", "duplicate action name 'siren' (also actions[0])"),
    ([coil(), coil(name="siren2")], "actions[1]", "drives the same coil as 'siren' (actions[0])"),
    ([coil(kind="relay")], "actions[0].kind", "unknown action kind 'relay'; known kinds: coil, gpio, program, register"),
    ([{"name": "x"}], "actions[0].kind", "missing required key"),
    (["coil"], "actions[0]", "expected a table"),
    ({"kind": "coil"}, "actions", "expected a list of action tables"),
    ([coil(kind="register", value_on=1, value_off=1)], "actions[0].value_off", "equals value_on"),
    ([coil(kind="register", value_on=70000, value_off=0)], "actions[0].value_on", "must be in 0..65535"),
    ([coil(kind="register", value_on=1)], "actions[0].value_off", "missing required key"),
    ([{"kind": "gpio", "name": "g", "pin": True, "when": {"rules": ["*"], "level": "red"}}], "actions[0].pin", "expected a pin number"),
    ([{"kind": "gpio", "name": "g", "when": {"rules": ["*"], "level": "red"}}], "actions[0].pin", "missing required key"),
    ([{"kind": "gpio", "name": "a", "pin": 17, "when": {"rules": ["*"], "level": "red"}},
      {"kind": "gpio", "name": "b", "pin": 17, "when": {"rules": ["*"], "level": "blue"}}], "actions[1]", "drives the same gpio"),
    ([{"kind": "program", "name": "p", "command": [], "when": {"rules": ["*"]}}], "actions[0].command", "must not be empty"),
    ([{"kind": "program", "name": "p", "command": "sms.sh", "when": {"rules": ["*"]}}], "actions[0].command", "expected a list of strings"),
    ([{"kind": "program", "name": "p", "command": ["sms", 3], "when": {"rules": ["*"]}}], "actions[0].command[1]", "expected a string"),
    ([{"kind": "program", "name": "p", "command": ["sms"], "timeout_s": 0, "when": {"rules": ["*"]}}], "actions[0].timeout_s", "must be > 0"),
    ([{"kind": "program", "name": "p", "command": ["sms"], "kinds": ["raised", "reset"], "when": {"rules": ["*"]}}],
     "actions[0].kinds[1]", "unknown transition kind 'reset'"),
    ([{"kind": "program", "name": "p", "command": ["sms"], "bus": "rs485-a", "when": {"rules": ["*"]}}], "actions[0].bus", "unknown key"),
])
def test_errors_name_the_field(raw: Any, path: str, reason: str) -> None:
    e = error_of(raw)
    assert e.path == path
    assert reason in e.reason, e.reason
    assert str(e).startswith(path + ": ")


def test_a_pattern_with_no_rules_configured_says_so() -> None:
    assert "(no rules configured)" in error_of([coil()], rule_ids=[]).reason


def test_levels_accept_names_and_colours_and_tcp_units_go_to_255() -> None:
    for text, level in [("II_ORANGE", Level.II_ORANGE), ("orange", Level.II_ORANGE), ("Red", Level.I_RED), ("iv_blue", Level.IV_BLUE)]:
        (c,) = parse_actions([coil(when={"rules": ["gas.lel1"], "level": text})], buses=BUSES, rule_ids=RULES)
        assert c.when.level == level
    (c,) = parse_actions([coil(bus="midas", unit=0)], buses=BUSES, rule_ids=RULES)
    assert c.unit == 0


def test_program_defaults() -> None:
    (p,) = parse_actions([{"kind": "program", "name": "p", "command": ["sms"], "when": {"rules": ["gas.*"]}}], buses={}, rule_ids=RULES)
    assert p.timeout_s == 10.0 and p.when.level is None and set(p.kinds) == set(TransitionKind)


def test_errors_are_value_errors() -> None:
    assert issubclass(ActionConfigError, ValueError)


def test_every_kind_module_declares_kind_config_sample_and_one_action_class() -> None:
    found = kinds()
    assert set(found) == {"coil", "register", "gpio", "program"}
    for name, kind in found.items():
        assert kind.module.KIND == name and Path(kind.module.__file__).name == f"{name}.py"
        assert kind.cls.__name__.endswith("Action") and kind.cls.__module__ == kind.module.__name__
        assert inspect.isclass(kind.config) and kind.config.__dataclass_params__.frozen
        assert kind.sample.strip().startswith("[[actions]]")
        assert is_output(kind) == (name != "program")


@pytest.mark.parametrize("name", ["coil", "register", "gpio", "program"])
def test_every_sample_loads_shows_every_option_and_builds(name: str) -> None:
    kind = kinds()[name]
    raw = tomllib.loads(kind.sample)["actions"]
    configs = parse_actions(raw, buses=BUSES, rule_ids=RULES)
    assert len(configs) == 1 and type(configs[0]) is kind.config
    for field in kind.config.__dataclass_fields__:
        if field != "path":
            assert f"{field} =" in kind.sample or f"{field} = " in kind.sample, f"{name}.SAMPLE does not show {field!r}"
    writers = {bus: object() for bus in BUSES}
    c = ActionController(configs, writers, SystemClock(), pin_factory=MockFactory())  # type: ignore[arg-type]
    assert list(c.status()) == [configs[0].name]


# -- package conventions ------------------------------------------------------------------------------


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(ACTIONS_DIR.glob("*.py"))]


def test_actions_never_read_a_clock_or_assert() -> None:
    banned = {("time", "time"), ("time", "monotonic"), ("time", "time_ns"), ("datetime", "now"),
              ("datetime", "utcnow"), ("asyncio", "sleep"), ("asyncio", "wait_for"), ("asyncio", "timeout")}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in banned, f"{path.name} calls {node.value.id}.{node.attr}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert "time" not in names, f"{path.name} imports time"
            if isinstance(node, ast.Assert):
                pytest.fail(f"{path.name}:{node.lineno} uses assert (vanishes under -O)")


def test_actions_import_only_value_types_and_the_clock_from_the_rest_of_the_gateway() -> None:
    allowed = {"gateway.clock", "gateway.rules.levels", "gateway.plugins"}  # no poll, spool, uplink or engine: app.py wires them
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(("gateway", "device_drivers")):
                assert node.module in allowed, f"{path.name} imports {node.module}"
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                pytest.fail(f"{path.name} imports from outside the package relatively")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("gateway", "device_drivers")), path.name


def test_gpiozero_is_imported_lazily() -> None:
    tree = ast.parse((ACTIONS_DIR / "gpio.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("gpiozero" in (getattr(n, "module", "") or "") or any("gpiozero" in a.name for a in n.names) for n in top_level)


def test_every_public_method_states_its_promise() -> None:
    import importlib
    import pkgutil

    import gateway.actions as package

    missing = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gateway.actions.{info.name}")
        for cls_name, cls in vars(module).items():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__ or cls_name.startswith("_"):
                continue
            for name, member in vars(cls).items():
                if name.startswith("_"):
                    continue
                func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(func) and not (func.__doc__ or "").strip():
                    missing.append(f"{module.__name__}.{cls_name}.{name}")
    assert missing == []
