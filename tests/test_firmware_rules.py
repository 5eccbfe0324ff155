"""The node's local alarms follow the gateway's threshold rule: the firmware's rules.py (imported
under CPython) and gateway/rules/threshold.py see the same readings and must show the same level
and fault flag after every one. Both are the real implementations; no fakes.

The node implements a subset: set/clear ladders, direction, on/off delays counted in readings,
out_of_range fault or raise_only. Time-based delays, latching, windows and stale or step checks
are gateway-only.
"""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from gateway.model import Quality, Reading
from gateway.rules.threshold import Config as GatewayConfig
from gateway.rules.threshold import ThresholdRule
from tests.firmware_helpers import import_firmware

import_firmware()

from yujing_node.config import Fields, Rule  # noqa: E402
from yujing_node.dec import parse  # noqa: E402
from yujing_node.records import DEC, NULL, Batch  # noqa: E402
from yujing_node.rules import Alarms  # noqa: E402

HIGH = [("IV_BLUE", "10", "9.5"), ("III_YELLOW", "20", "19.5"), ("II_ORANGE", "30", "30"), ("I_RED", "40", "38")]
LOW = [("III_YELLOW", "19.5", "19.6"), ("I_RED", "18", "18.5")]


def both(direction, ladder, on, off, oor):
    node_rule = Rule(
        Fields(
            "/config.json",
            "rules[0]",
            {
                "point": "dev/x",
                "direction": direction,
                "levels": [{"level": lv, "set": s, "clear": c} for lv, s, c in ladder],
                "on_delay_count": on,
                "off_delay_count": off,
                "out_of_range": oor,
            },
        ),
        {"dev/x": 0},
    )
    gw = ThresholdRule(
        GatewayConfig.from_dict(
            {
                "kind": "threshold",
                "id": "x",
                "point": "dev.x",
                "direction": direction,
                "levels": [{"level": lv, "set": float(s), "clear": float(c)} for lv, s, c in ladder],
                "on_delay_count": on,
                "off_delay_count": off,
                "out_of_range": oor,
            },
            "rules[0]",
        ),
        lambda name: 0,
    )
    return Alarms([node_rule]), gw


@pytest.mark.parametrize("direction,ladder", [("high", HIGH), ("low", LOW)])
@pytest.mark.parametrize("on,off", [(1, 1), (2, 1), (1, 3), (3, 2)])
@pytest.mark.parametrize("oor", ["fault", "raise_only"])
def test_same_levels_and_faults_as_the_gateway(direction, ladder, on, off, oor) -> None:
    rng = random.Random(f"{direction}{on}{off}{oor}")
    node, gw = both(direction, ladder, on, off, oor)
    edges = sorted({Decimal(s) for _, s, c in ladder} | {Decimal(c) for _, s, c in ladder})
    seen = set()
    for i in range(600):
        ts = 1_000_000 + 1000 * i
        r = rng.random()
        if r < 0.08:
            value, quality = None, rng.choice([Quality.TIMEOUT, Quality.FRAMING, 0x82])
        else:
            base = rng.choice(edges)
            value = base + Decimal(rng.choice([-2, -1, -0.1, -0.05, 0, 0, 0.05, 0.1, 1, 2, 10])).quantize(
                Decimal("0.01")
            )
            quality = Quality.OUT_OF_RANGE if r < 0.15 else Quality.GOOD
        b = Batch(1)
        if value is None:
            b.add(0, ts, NULL, 0, 0, quality)
        else:
            m, e = parse(str(value))
            b.add(0, ts, DEC, e, m, quality)
        node.evaluate(b)
        gw.evaluate(Reading(0, ts, float(value) if value is not None else None, quality))
        state = gw.state()
        seen.add((node.level[0], node.fault[0]))
        assert (node.level[0], bool(node.fault[0])) == (int(state.level), state.fault), (
            f"reading {i}: {value} q={quality}: node level {node.level[0]} fault {node.fault[0]}, "
            f"gateway {int(state.level)} fault {state.fault}"
        )
    levels = {lv for lv, _ in seen}
    assert len(levels) >= 3 and {0, 1} <= {f for _, f in seen}, f"the sequence exercised too little: {sorted(seen)}"
