"""What a driver is: it turns configured devices into readings, either when the bus scheduler asks
(polled) or as frames arrive (pushed). The scheduler (gateway.poll) keeps what every bus needs: one
transaction at a time, pacing, the schedule, backoff, device states. A driver keeps its protocol.

A driver kind is one module in `device_drivers/drivers/` that declares

    KIND       the bus `type` names it serves, e.g. ("tcp", "rtu") or ("serial_line",)
    SAMPLE     a TOML snippet of a bus and a device, with every option (commented defaults)
    parse_bus(r: Reader, kind) -> settings | None           the bus table's own keys
    parse_device(r: Reader, bus) -> (spec, points) | None   the device table's own keys and its points
    check(buses, devices, errors)                           optional: checks across devices and buses
    class <Name>Driver(bus, devices)                        the runtime, with the methods below

and is found by scanning the package (`device_drivers.registry`); importing registers nothing. A point
spec is any object with `name`, `unit` and `type` (what the birth catalogue says about it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .model import Value

T = TypeVar("T")


class TransportError(Exception):
    """The port or connection is unavailable; the whole bus backs off."""


def serial_open_failure(port: str, exc: BaseException | None = None) -> str:
    """`cannot open PORT: <the OS's reason> (<what to do>)`, for a serial port that does not open.

    `exc` is the error the open raised, if the library passed it on (pyserial's carries the errno); without
    one (pymodbus only says it failed), the port is opened here once to ask the OS why."""
    import errno as E
    import os

    code = getattr(exc, "errno", None) if exc is not None else None
    if not isinstance(code, int) or code <= 0:
        try:
            os.close(os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        except OSError as probe:
            code = probe.errno
        else:
            code = None
    if not code:
        detail = str(exc) if exc is not None and str(exc) else "the port opened when tried again; it may be flaky or in use"
        return f"cannot open {port}: {detail}"
    gone = "the device is gone: unplugged, or its driver is not loaded (dmesg | tail)"
    group = ("add the gateway's user to the dialout group: sudo usermod -aG dialout USER, then log in again or restart "
             "the service")
    busy = f"another program holds it: fuser -v {port}"
    hints = {
        E.ENOENT: f"is the adapter plugged in, is {port} its name? ls -l /dev/serial/by-id lists the adapters there are",
        E.ENODEV: gone, E.ENXIO: gone, E.EACCES: group, E.EPERM: group, E.EBUSY: busy, E.EAGAIN: busy,
        E.EISDIR: "a directory, not a serial port: check the bus's port",
    }
    hint = hints.get(code)
    return f"cannot open {port}: {os.strerror(code)}" + (f" ({hint})" if hint else "")


class DeviceError(Exception):
    """A read failed with a device-side cause; `quality` says which (timeout, CRC, Modbus exception…)."""

    def __init__(self, quality: int, detail: str) -> None:
        super().__init__(detail)
        self.quality = quality


@dataclass(frozen=True, kw_only=True)
class Device:
    """A configured device as the driver sees it: its name, its bus, its points and the driver's own `spec`
    (the gateway's DeviceConfig adds the scheduling keys)."""

    name: str
    bus: str
    points: tuple[Any, ...]  # the driver's point specs (name, unit, type, …)
    spec: Any = None  # the driver's device settings (Modbus: unit id, coalescing; SL 651: station address)


Result = tuple[Value, int]  # (value, quality) of one point
# Pushed readings of one device: (index of the point in the device, epoch ms, value, quality) …
Delivery = Callable[[str, Sequence[tuple[int, int, Value, int]]], None]


class Link(Protocol):
    """What the bus scheduler lends a polled driver: the wire, one exchange at a time."""

    async def transaction(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one exchange on the wire: after the bus's quiet time, never overlapping another (writes to
        outputs go first), counted and watched by the scheduler."""
        ...

    async def pause(self, seconds: float) -> None:
        """Wait on the scheduler's clock (between retries)."""
        ...

    def now_ms(self) -> int:
        """The scheduler's wall clock, epoch ms: what a reading without a time of its own is stamped with."""
        ...


class Driver(Protocol):
    def polled(self, device: Device) -> bool:
        """Whether the scheduler polls this device (else the driver pushes its readings from run())."""
        ...

    async def read(self, device: Device, link: Link, attempts: int, group: tuple[int, ...] | None = None) -> tuple[list[Result], bool]:
        """Poll one device (or the group of its points with these indexes): a (value, quality) for each
        point, in order, and whether the device answered at all. Raises TransportError when the port or
        connection is gone."""
        ...

    async def run(self, deliver: Delivery, link: Link) -> None:
        """Serve the pushed devices until cancelled (a listening port, a stream of lines). Never returns or
        raises on bad input: garbage and silence become bad-quality readings and log lines."""
        ...

    async def write(self, kind: str, unit: int, address: int, value: int | bool, link: Link) -> None:
        """Write an output (a coil or register). Raises DeviceError/TransportError, or ValueError when this
        protocol has no such output."""
        ...

    def close(self) -> None:
        """Release ports and sockets; safe to call twice."""
        ...
