"""Errors raised by the alarm outputs. Each one says where the problem is.

Configuration errors derive from `gateway.plugins.FieldError` (a ValueError carrying `path` and `reason`),
which `gateway.config` turns into `file:line: path: reason`.
"""

from __future__ import annotations

from gateway.plugins import FieldError


class ActionConfigError(FieldError):
    """An action configuration is invalid. `path` names the field, e.g. `actions[2].when.level`."""


class ActuatorError(Exception):
    """One attempt to drive an output (or run a program) failed. The message names the action and the
    actuator (bus, unit, address; pin; command) and the cause; the controller logs it, raises an
    `actuator_fault` event and retries. Library exceptions are chained as `__cause__`."""
