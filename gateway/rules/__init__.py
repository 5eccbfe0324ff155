"""Local alarm rules: readings in, alarm transitions out, evaluated on the gateway whatever the uplink does.

    from gateway.rules import AlarmEngine, FileStateStore, parse_rules
    engine = AlarmEngine(parse_rules(site_toml["rules"]), catalogue_index.__getitem__,
                         store=FileStateStore("/var/lib/yujing/alarms.json"))
    for t in engine.evaluate(reading): ...          # every reading
    for t in engine.tick(clock.now_ms()): ...       # every second or so
    engine.acknowledge("chem.zone1.vote", "operator:li", now_ms)
    engine.snapshot()                               # retained status

Kinds (one module each, with KIND, Config, SAMPLE and a *Rule class): threshold, rate, accumulation,
combination. Every rule also takes a time window, on/off delays, a latch and (point rules) fault checks.
"""

from .common import CommonConfig, FaultConfig, LevelSpec, PointConfig, WindowConfig
from .engine import AlarmEngine
from .errors import RuleConfigError, RuleStateError, UnknownRuleError
from .levels import LEVEL_KINDS, AlarmState, Level, Transition, TransitionKind
from .registry import kinds, order_rules, parse_rule, parse_rules
from .state import FileStateStore, MemoryStateStore, StateStore

__all__ = [
    "AlarmEngine",
    "AlarmState",
    "CommonConfig",
    "FaultConfig",
    "FileStateStore",
    "LEVEL_KINDS",
    "Level",
    "LevelSpec",
    "MemoryStateStore",
    "PointConfig",
    "RuleConfigError",
    "RuleStateError",
    "StateStore",
    "Transition",
    "TransitionKind",
    "UnknownRuleError",
    "WindowConfig",
    "kinds",
    "order_rules",
    "parse_rule",
    "parse_rules",
]
