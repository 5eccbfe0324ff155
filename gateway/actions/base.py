"""What the controller needs from an action, what actions need from the gateway, and the Modbus output
that coil and register actions share.

An *output* action (coil, register, gpio) turns a desired state into the actuator's state:
`await apply(on)` is idempotent, so the controller may call it again at any time (retries, reasserts).
An *event* action (program) runs once per matching transition: `wants(t)` then `await fire(t)`.
Both raise ActuatorError (naming the actuator and the cause) when the attempt fails; the controller
retries, bounds the time, logs and reports. Actions never read a clock or sleep on their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.rules.levels import Transition

from .common import ActionConfig, BusOutputConfig, OutputConfig
from .errors import ActionConfigError, ActuatorError


class BusWriter(Protocol):
    """One Modbus bus that can write (gateway.poll.bus.BusScheduler fits)."""

    async def write(self, kind: str, unit: int, address: int, value: int | bool) -> None:
        """Write one coil ("coil") or holding register ("register"); return once the device confirmed it,
        raise (DeviceError, TransportError, …) when it did not."""
        ...


@dataclass(frozen=True)
class Context:
    """What actions may use: the bus writers by bus name, the clock, and gpiozero's pin factory (None:
    gpiozero's default, chosen by GPIOZERO_PIN_FACTORY)."""

    writers: Mapping[str, BusWriter]
    clock: Clock
    pin_factory: Any = None


class OutputAction(Protocol):
    """An output whose state follows the alarm levels."""

    config: OutputConfig
    target: str  # human-readable: "bus rs485-a unit 10 coil 0"

    async def apply(self, on: bool) -> None:
        """Drive the output to `on` (True) or off. Idempotent: the same state twice is harmless.
        Raises ActuatorError naming the actuator and the cause."""
        ...

    def close(self) -> None:
        """Release what the action opened (a GPIO pin); the output keeps its last state where the
        hardware allows. Safe to call twice."""
        ...


class EventAction(Protocol):
    """An action run for each matching transition."""

    config: ActionConfig
    target: str

    def wants(self, transition: Transition) -> bool:
        """Whether this transition should fire the action (rule, kind and level filters). Cheap."""
        ...

    async def fire(self, transition: Transition) -> None:
        """Run the action once for `transition`. Raises ActuatorError when it failed."""
        ...

    def close(self) -> None:
        """Release resources; safe to call twice."""
        ...


class BusOutput:
    """A coil or register written through the bus's writer (shared by the coil and register kinds)."""

    table = ""  # "coil" or "register", as BusWriter.write takes it

    def __init__(self, config: BusOutputConfig, ctx: Context) -> None:
        writer = ctx.writers.get(config.bus)
        if writer is None:
            known = ", ".join(sorted(ctx.writers)) or "(none)"
            raise ActionConfigError(config.where("bus"), f"no writer for bus {config.bus!r}; buses with a writer: {known}")
        self.config = config
        self._writer = writer
        self.target = f"bus {config.bus} unit {config.unit} {self.table} {config.address}"

    def value(self, on: bool) -> int | bool:
        """The value written for state `on`."""
        raise NotImplementedError

    async def apply(self, on: bool) -> None:
        """Write the value for `on`; raises ActuatorError with bus, unit, address and the device's error."""
        value = self.value(on)
        c = self.config
        try:
            await self._writer.write(self.table, c.unit, c.address, value)
        except Exception as exc:  # the writer's errors (DeviceError, TransportError, …) become ours
            raise ActuatorError(f"{self.target}: writing {value!r} failed: {exc or type(exc).__name__}") from exc

    def close(self) -> None:
        """Nothing to release: the bus belongs to its scheduler."""
