"""Local alarm outputs: sirens, strobes, fan interlocks and notification programs, driven by the alarm levels
on the gateway itself, whatever the state of the uplink.

    from gateway.actions import ActionController, parse_actions
    configs = parse_actions(site_toml["actions"], buses={"rs485-a": "rtu"}, rule_ids=engine.rule_ids)
    actions = ActionController(configs, {s.bus.name: s for s in schedulers}, clock, on_event=spool_event)
    actions.update({r: s.level for r, s in engine.snapshot().items()}, ())  # once at start (restored state)
    tg.create_task(actions.run(), name="actions")
    ...
    actions.update(levels, transitions)   # after every batch of readings, tick or acknowledgement

Kinds (one module each, with KIND, Config, SAMPLE and an *Action class): coil, register, gpio (state
outputs: ON while a matching rule shows ≥ when.level) and program (runs a command per transition).
"""

from .base import BusWriter, Context, EventAction, OutputAction
from .common import ActionConfig, BusOutputConfig, OutputConfig, When
from .controller import ActionController, ActuatorEvent
from .errors import ActionConfigError, ActuatorError
from .registry import Kind, build_action, kind_of, kinds, parse_action, parse_actions

__all__ = [
    "ActionConfig",
    "ActionConfigError",
    "ActionController",
    "ActuatorError",
    "ActuatorEvent",
    "BusOutputConfig",
    "BusWriter",
    "Context",
    "EventAction",
    "Kind",
    "OutputAction",
    "OutputConfig",
    "When",
    "build_action",
    "kind_of",
    "kinds",
    "parse_action",
    "parse_actions",
]
