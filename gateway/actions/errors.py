"""Errors raised by the alarm outputs. Each one says where the problem is.

Like `gateway.rules.errors`, these should become subclasses of `gateway.errors.ConfigError` once that module
exists (style anchor 7); until then they derive from the built-in exception a caller would expect.
"""

from __future__ import annotations


class ActionConfigError(ValueError):
    """An action configuration is invalid. `path` names the field, e.g. `actions[2].when.level`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class ActuatorError(Exception):
    """One attempt to drive an output (or run a program) failed. The message names the action and the
    actuator (bus, unit, address; pin; command) and the cause; the controller logs it, raises an
    `actuator_fault` event and retries. Library exceptions are chained as `__cause__`."""
