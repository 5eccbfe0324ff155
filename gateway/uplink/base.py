"""Uplinks beside the platform's MQTT uplink: what they are given, and how they are found.

An uplink kind is one module in this package that declares `KIND`, a `Config` (from_dict, with an
optional `check(resolve)` against the site's points), a `SAMPLE` and one class ending in `Uplink`, built as
`XxxUplink(config, context)` and run as `await uplink.run(stop)` under the gateway's supervisor: a
failing or hanging uplink is restarted and reported, never in the way of polling or alarms. It sees the
gateway through `UplinkContext` only, and may only read from it:

- `latest`: the newest reading of every point (updated on the poll path: one dict store per reading);
- `subscribe()`: a bounded queue of alarm events (raised, cleared, faults…), as the platform gets them;
- `main`: whether the platform's uplink is connected, and since when it is down;
- `health`, to report its own faults (a modem without a SIM, a centre that refuses).

The platform's uplink (`[uplink]`, gateway.uplink.mqtt) is the one that drains the spool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from gateway import wire
from gateway.clock import Clock
from gateway.health import Health
from gateway.model import PointInfo, Reading
from gateway.plugins import Kind, scan_kinds

log = logging.getLogger("yujing.uplink")


@cache
def kinds() -> Mapping[str, Kind]:
    """Every uplink kind in this package, by name."""
    return scan_kinds(__package__, "Uplink", lazy=True)


class LatestValues:
    """The newest reading of each catalogue point."""

    __slots__ = ("readings",)

    def __init__(self, size: int) -> None:
        self.readings: list[Reading | None] = [None] * size

    def update(self, readings: Sequence[Reading]) -> None:
        store = self.readings
        for r in readings:
            store[r.point] = r

    def get(self, point: int) -> Reading | None:
        return self.readings[point]


class EventFanout:
    """Alarm events to storage (the platform) and to every subscribed uplink, without ever blocking: a
    subscriber that does not keep up loses its oldest events (counted), not the gateway's time."""

    def __init__(self, storage: Any, limit: int = 1000) -> None:
        self.storage = storage
        self.limit = limit
        self.queues: list[asyncio.Queue[wire.Event]] = []
        self.dropped = 0

    def subscribe(self) -> asyncio.Queue[wire.Event]:
        q: asyncio.Queue[wire.Event] = asyncio.Queue(maxsize=self.limit)
        self.queues.append(q)
        return q

    def append_events(self, events: Sequence[wire.Event]) -> None:
        self.storage.append_events(events)
        for q in self.queues:
            for e in events:
                if q.full():
                    q.get_nowait()
                    self.dropped += 1
                q.put_nowait(e)


@dataclass
class MainLink:
    """The platform uplink's state, as the others may see it."""

    connected: bool = False
    down_since_ms: int | None = None  # None while connected


@dataclass
class UplinkContext:
    site: str
    gateway: str
    catalogue: tuple[PointInfo, ...]
    resolve: Callable[[str], int]
    clock: Clock
    health: Health
    latest: LatestValues
    fanout: EventFanout
    main: MainLink = field(default_factory=MainLink)
    rules_on_point: Callable[[int], tuple[str, ...]] = lambda point: ()  # which rules read a point

    def subscribe(self) -> asyncio.Queue[wire.Event]:
        return self.fanout.subscribe()


def build(config: Any, context: UplinkContext) -> Any:
    kind = kinds().get(getattr(config, "kind", ""))
    if kind is None or type(config) is not kind.config:
        raise TypeError(f"{type(config).__name__} is not the Config of a known uplink kind")
    return kind.cls(config, context)
