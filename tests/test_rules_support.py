"""Helpers shared by the tests/test_rules_*.py files (this module holds no tests).

Time is always driven by the test: timestamps are built here and passed explicitly.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone

from gateway.model import Quality, Reading
from gateway.rules import AlarmEngine, Level, Transition, parse_rules

CST = timezone(timedelta(hours=8))  # Kunming local time
SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY = 24 * HOUR

T0 = int(datetime(2025, 7, 15, 8, 0, tzinfo=CST).timestamp() * 1000)  # mid flood season


def local_ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> int:
    """Epoch ms of a Kunming local wall-clock time."""
    return int(datetime(y, mo, d, h, mi, tzinfo=CST).timestamp() * 1000)


class Site:
    """An engine built from a TOML snippet, with point names mapped to indexes in order of appearance."""

    def __init__(self, toml_text: str, *, store=None, points: Sequence[str] = ()) -> None:
        raw = tomllib.loads(toml_text)
        self.configs = parse_rules(raw["rules"])
        self.index = {name: i for i, name in enumerate(points)}
        # the catalogue: names get indexes in the order the engine asks for them
        self.engine = AlarmEngine(self.configs, lambda name: self.index.setdefault(name, len(self.index)), store=store)

    def read(self, point: str, ts_ms: int, value, quality: int = Quality.GOOD) -> list[Transition]:
        return self.engine.evaluate(Reading(self.index[point], ts_ms, value, quality))

    def series(self, point: str, start_ms: int, step_ms: int, values: Iterable) -> list[Transition]:
        out: list[Transition] = []
        for i, value in enumerate(values):
            out += self.read(point, start_ms + i * step_ms, value)
        return out

    def level(self, rule: str) -> Level:
        return self.engine.level(rule)

    def state(self, rule: str):
        return self.engine.snapshot()[rule]


def brief(transitions: Iterable[Transition]) -> list[tuple[str, str, str]]:
    """(kind, rule, new level name) for compact assertions."""
    return [(str(t.kind), t.rule, t.new_level.name) for t in transitions]


def steps(transitions: Iterable[Transition]) -> list[tuple[str, str, str]]:
    """(kind, old level name, new level name)."""
    return [(str(t.kind), t.old_level.name, t.new_level.name) for t in transitions]
