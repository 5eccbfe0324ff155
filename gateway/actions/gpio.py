"""GPIO action: a pin of the gateway board itself (through gpiozero), on while the watched alarms are at or
above a level. For a siren relay wired straight to the gateway, independent of any RS-485 bus.

gpiozero is an optional extra (`pip install 'yujing[gpio]'`; Raspberry Pi OS ships it) and is imported only
when a gpio action first drives its pin, so sites without one never need it. The pin factory is injected
(tests pass gpiozero's MockFactory); None means gpiozero's default (GPIOZERO_PIN_FACTORY, else lgpio…).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ._parse import Table
from .base import Context
from .common import OutputConfig, parse_common
from .errors import ActuatorError

KIND = "gpio"

SAMPLE = """\
[[actions]]
kind = "gpio"
name = "board.siren"                # unique; letters, digits and _ . -
description = "Siren relay on the gateway's own header, works even if the RS-485 relay module is dead"
when = { rules = ["*"], level = "I_RED" }   # every rule; also "red"
pin = 17                            # BCM number, or a gpiozero name such as "GPIO17" or "BOARD11"
# active_high = true                # false: the pin is driven low for ON (active-low relay boards)
"""


@dataclass(frozen=True, kw_only=True)
class Config(OutputConfig):
    kind: ClassVar[str] = KIND
    pin: int | str
    active_high: bool = True

    def target(self) -> tuple[Any, ...]:
        """("gpio", pin): two actions may not drive the same pin."""
        return (KIND, str(self.pin))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str) -> Config:
        """Build the typed config from one action table; raises ActionConfigError naming the bad field."""
        t = Table(raw, path)
        args = parse_common(t, KIND, output=True)
        t.has("pin")
        pin = t.raw.get("pin")
        if pin is None:
            raise t.error("pin", "missing required key")
        if isinstance(pin, bool) or not isinstance(pin, (int, str)) or (isinstance(pin, int) and pin < 0):
            raise t.error("pin", f"expected a pin number (BCM) or a name such as \"GPIO17\", got {pin!r}")
        if isinstance(pin, str) and not pin.strip():
            raise t.error("pin", "must not be empty")
        active_high = t.boolean("active_high", True)
        t.finish()
        return cls(**args, pin=pin, active_high=active_high)


class GpioAction:
    def __init__(self, config: Config, ctx: Context) -> None:
        self.config = config
        self.target = f"gpio pin {config.pin}" + ("" if config.active_high else " (active low)")
        self._factory = ctx.pin_factory
        self._device: Any = None

    async def apply(self, on: bool) -> None:
        """Set the pin; opens it on first use (with the wanted state, so it never blips). Raises
        ActuatorError when gpiozero is missing or the pin cannot be claimed or set."""
        try:
            if self._device is None:
                self._device = self._open(on)
            elif on:
                self._device.on()
            else:
                self._device.off()
        except ActuatorError:
            raise
        except Exception as exc:  # gpiozero's errors: bad pin, pin in use, no pin factory, …
            self._forget()
            raise ActuatorError(f"{self.target}: setting {'on' if on else 'off'} failed: {type(exc).__name__}: {exc}") from exc

    def _open(self, on: bool) -> Any:
        try:
            from gpiozero import OutputDevice
        except ImportError as exc:
            raise ActuatorError(f"{self.target}: gpiozero is not installed (pip install 'yujing[gpio]')") from exc
        return OutputDevice(self.config.pin, active_high=self.config.active_high, initial_value=on, pin_factory=self._factory)

    def _forget(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            try:
                device.close()
            except Exception:  # already broken; the next apply() opens it again
                pass

    def close(self) -> None:
        """Release the pin (gpiozero may return it to an input). Safe to call twice."""
        self._forget()
