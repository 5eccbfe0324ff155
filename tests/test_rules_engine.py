"""The engine as a whole: indexing by point, snapshots, purity, and the KM-RES-01 site profile."""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path

import pytest

from gateway.model import Quality, Reading
from gateway.rules import AlarmEngine, Level, Transition, TransitionKind, parse_rules

from .test_rules_support import MIN, SEC, T0, Site, brief, local_ms

RULES_DIR = Path(__file__).resolve().parents[1] / "gateway" / "rules"

# KM-RES-01 (docs/domain.md §7.1) as a site would write it.
KM_RES_01 = """
[[rules]]
kind = "threshold"
id = "res.zu.flood_season"
point = "radar.ZU"
description = "ZU ≥ 1953.20 → blue, ≥ 汛限 1953.50 → yellow, in the flood season"
levels = [
  { level = "IV_BLUE",    set = 1953.20, clear = 1953.15 },
  { level = "III_YELLOW", set = 1953.50, clear = 1953.45 },
]
window = { start = "06-01", end = "10-31", utc_offset = "+08:00" }
[rules.fault]
interval_s = 60
max_step = 0.5
max_step_per_s = 60

[[rules]]
kind = "threshold"
id = "res.zu"
point = "radar.ZU"
description = "ZU ≥ 防洪高水位 1956.20 → orange, ≥ 设计洪水位 1956.80 → red"
levels = [
  { level = "II_ORANGE", set = 1956.20, clear = 1956.15 },
  { level = "I_RED",     set = 1956.80, clear = 1956.75 },
]
[rules.fault]
interval_s = 60
max_step = 0.5
max_step_per_s = 60

[[rules]]
kind = "rate"
id = "res.zu.rise"
point = "radar.ZU"
window_s = 3600
per_s = 3600
levels = [ { level = "III_YELLOW", set = 0.10, clear = 0.08 }, { level = "II_ORANGE", set = 0.30, clear = 0.25 } ]
on_delay_count = 2
[rules.fault]
max_step = 0.5
max_step_per_s = 60

[[rules]]
kind = "accumulation"
id = "res.rain"
point = "rain.total"
modulus = 429496729.6
levels = [
  { level = "IV_BLUE",    window_s = 3600,  set = 30.0 },
  { level = "III_YELLOW", window_s = 10800, set = 50.0 },
  { level = "II_ORANGE",  window_s = 10800, set = 100.0 },
]
[rules.fault]
interval_s = 60

[[rules]]
kind = "threshold"
id = "res.piezo.p1"
point = "p1.head"
levels = [ { level = "III_YELLOW", set = 1948.50, clear = 1948.40 }, { level = "II_ORANGE", set = 1949.00, clear = 1948.90 } ]
[rules.fault]
interval_s = 600
min = 1930.0
max = 1960.0
"""


def test_rising_hydrograph_crosses_flood_limit_and_a_glitch_faults_instead_of_red():
    site = Site(KM_RES_01, points=["battery.V"])
    t = local_ms(2025, 7, 20, 2, 0)
    level, rain, out = 1953.00, 100.0, []
    for _ in range(240):  # four hours: rain 0.3 mm/min, level up 0.15 m/h
        level += 0.0025
        rain += 0.3
        out += site.read("radar.ZU", t, round(level, 3))
        out += site.read("rain.total", t, rain)
        out += site.engine.tick(t)
        t += MIN
    raised = [(r, lv) for k, r, lv in brief(out) if k in ("raised", "escalated")]
    assert ("res.zu.flood_season", "IV_BLUE") in raised
    assert ("res.zu.flood_season", "III_YELLOW") in raised  # crossed 汛限
    assert ("res.zu.rise", "III_YELLOW") in raised  # 0.15 m/h ≥ 0.10
    assert ("res.rain", "III_YELLOW") in raised  # 3 h total 54 mm ≥ 50
    assert site.level("res.zu") == Level.NONE
    # the piezometer never reported: that is a fault, not a quiet NONE
    assert site.state("res.piezo.p1").fault and "stale" in site.state("res.piezo.p1").fault_reason
    out = site.read("radar.ZU", t, 1962.95)  # radar glitch spike
    assert {k for k, _, _ in brief(out)} == {"fault"}
    assert site.level("res.zu") == Level.NONE  # never a false red
    assert site.level("res.zu.flood_season") == Level.III_YELLOW  # never a cleared alarm


def test_a_reading_of_an_unused_point_costs_a_lookup():
    site = Site(KM_RES_01, points=["battery.V"])
    unused = Reading(site.index["battery.V"], T0, 12.6)
    assert site.engine.evaluate(unused) == []
    assert site.index["battery.V"] not in site.engine.points
    n = 100_000
    start = time.perf_counter()
    for _ in range(n):
        site.engine.evaluate(unused)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 5e-6  # generous: about 0.1 µs on a laptop


def test_evaluation_per_reading_is_cheap():
    site = Site(KM_RES_01)
    point = site.index["radar.ZU"]
    n = 20_000
    start = time.perf_counter()
    for i in range(n):  # three rules on this point, one reading a second
        site.engine.evaluate(Reading(point, T0 + i * SEC, 1953.0 + (i % 7) * 0.001))
    per_reading = (time.perf_counter() - start) / n
    assert per_reading < 200e-6  # generous for a Raspberry Pi class board; tens of µs here


def test_snapshot_is_json_able_and_complete():
    site = Site(KM_RES_01)
    site.read("radar.ZU", T0, 1953.60)
    site.read("p1.head", T0, None, Quality.TIMEOUT)
    snap = site.engine.snapshot()
    assert list(snap) == ["res.zu.flood_season", "res.zu", "res.zu.rise", "res.rain", "res.piezo.p1"]
    doc = json.loads(json.dumps({k: v.as_dict() for k, v in snap.items()}))
    assert doc["res.zu.flood_season"] == {
        "rule": "res.zu.flood_season", "level": 2, "colour": "yellow", "condition": 2, "latched": False,
        "acked": False, "fault": False, "fault_reason": None, "since_ms": T0, "fault_since_ms": None,
        "in_window": True,
    }
    assert doc["res.piezo.p1"]["fault"] is True and doc["res.piezo.p1"]["level"] == 0


def test_transitions_are_frozen_and_serialisable():
    site = Site(KM_RES_01)
    t = site.read("radar.ZU", T0, 1953.60)[0]
    assert isinstance(t, Transition) and t.kind is TransitionKind.RAISED
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.kind = TransitionKind.CLEARED  # type: ignore[misc]
    assert json.loads(json.dumps(t.as_dict()))["values"] == {"0": 1953.6}


def test_engine_accepts_typed_configs_built_once():
    configs = parse_rules([{"kind": "threshold", "id": "a", "point": "p", "levels": [{"level": "red", "set": 1}]}])
    one = AlarmEngine(configs, {"p": 7}.__getitem__)
    two = AlarmEngine(configs, {"p": 3}.__getitem__)  # configs are immutable and shareable
    assert brief(one.evaluate(Reading(7, T0, 2))) == [("raised", "a", "I_RED")]
    assert two.evaluate(Reading(7, T0, 2)) == [] and two.level("a") == Level.NONE


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(RULES_DIR.glob("*.py"))]


def test_rules_never_read_a_clock():
    banned = {("time", "time"), ("time", "monotonic"), ("time", "time_ns"), ("datetime", "now"),
              ("datetime", "utcnow"), ("date", "today"), ("asyncio", "sleep")}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in banned, f"{path.name} calls {node.value.id}.{node.attr}"
            if isinstance(node, ast.ImportFrom) and node.module == "time":
                pytest.fail(f"{path.name} imports from time")
            if isinstance(node, ast.Assert):
                pytest.fail(f"{path.name}:{node.lineno} uses assert (vanishes under -O)")


def test_rules_import_only_the_model_from_the_rest_of_the_gateway():
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                # storefiles: the leaf helpers for atomic 0600 state files (no gateway imports of its own)
                assert node.module in ("model", "plugins", "storefiles"), f"{path.name} imports gateway.{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("gateway.") or node.module.startswith("gateway.rules"), path.name
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("gateway"), path.name


def test_every_public_method_states_its_promise():
    import importlib
    import inspect
    import pkgutil

    import gateway.rules as package

    missing = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gateway.rules.{info.name}")
        for cls_name, cls in vars(module).items():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__ or cls_name.startswith("_"):
                continue
            if getattr(cls, "_is_protocol", False) and cls_name != "StateStore":
                continue  # structural types for the engine's own use
            for name, member in vars(cls).items():
                if name.startswith("_"):
                    continue
                func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(func) and not (func.__doc__ or "").strip():
                    missing.append(f"{module.__name__}.{cls_name}.{name}")
    assert missing == []
