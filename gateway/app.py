"""The wiring: the only module that knows every stage.

    buses ──readings──▶ sink ──▶ spool (SQLite, durable) ──▶ uplink (MQTT) ──▶ broker
    (one scheduler        │
     per bus)             └── rules/alarms (local; see issue 3)

Start order: spool, uplink, then pollers. Stop order: pollers first, then the uplink, which
publishes the clean death. Shutdown is a parameter (an asyncio.Event), set by SIGTERM/SIGINT in
production and by the test or demo that runs the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from device_drivers.modbus import ModbusTransport, Transport
from gateway import __version__
from gateway.clock import Clock, SystemClock
from gateway.config import BusConfig, Config
from gateway.model import Reading
from gateway.poll.bus import BusScheduler
from gateway.spool import Spool, SpoolError
from gateway.uplink.mqtt import Identity, Uplink

log = logging.getLogger("yujing.gateway")

TransportFactory = Callable[[BusConfig], Transport]


def modbus_transport(bus: BusConfig) -> Transport:
    return ModbusTransport(bus.name, bus.settings)


@dataclass
class Gateway:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    transport_factory: TransportFactory = modbus_transport
    historical_after_s: float = 60.0
    # observable state, for `yujing run` logs, tests and the benchmark
    schedulers: list[BusScheduler] = field(default_factory=list)
    uplink: Uplink | None = None
    spool: Spool | None = None
    session: int = 0
    readings: int = 0
    spool_errors: int = 0

    def _sink(self, readings: list[Reading]) -> None:
        self.readings += len(readings)
        # Alarm rules run here, before the spool, so a full disk cannot delay a siren (issue 3).
        if self.spool is None:  # not started yet
            return
        try:
            self.spool.append(self.session, readings)
        except SpoolError as exc:
            self.spool_errors += 1
            if self.spool_errors == 1 or self.spool_errors % 1000 == 0:
                log.error("%s (%d polls not stored so far); polling and alarms go on", exc, self.spool_errors)
            return
        if self.uplink is not None:
            self.uplink.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        self.spool = Spool(cfg.spool.path, max_bytes=cfg.spool.max_bytes)
        self.session = self.spool.start_session(cfg.catalogue, self.clock.time_ms())
        log.info("site %s gateway %s: session %d, %d devices, %d points, spool %s (%d readings and %d messages waiting)",
                 cfg.site.id, cfg.site.gateway, self.session, len(cfg.devices), len(cfg.catalogue), cfg.spool.path,
                 self.spool.backlog(), len(self.spool.unsent(limit=1_000_000)))
        self.uplink = Uplink(cfg.uplink, Identity(cfg.site.id, cfg.site.gateway, __version__), self.spool, self.session,
                             self.clock, historical_after_s=self.historical_after_s)
        base = 0
        bases: dict[str, int] = {}
        for d in cfg.devices:
            bases[d.name] = base
            base += len(d.points)
        self.schedulers = [
            BusScheduler(bus, [(d, bases[d.name]) for d in cfg.devices if d.bus == bus.name], self.transport_factory(bus), self.clock, self._sink)
            for bus in cfg.buses
            if any(d.bus == bus.name for d in cfg.devices)
        ]
        try:
            async with asyncio.TaskGroup() as tg:
                uplink_task = tg.create_task(self.uplink.run(stop), name="uplink")
                pollers = [tg.create_task(s.run(), name=f"bus-{s.bus.name}") for s in self.schedulers]
                await stop.wait()
                for t in pollers:
                    t.cancel()
                await uplink_task
        finally:
            self.spool.close()


async def run_until_signalled(gateway: Gateway, *, grace_s: float = 4.5) -> None:
    """Run until SIGTERM or SIGINT, then stop within the grace period."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(gateway.run(stop), name="gateway")
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() and not task.done():
        log.info("stopping (signal)")
        try:
            await asyncio.wait_for(task, grace_s)
        except TimeoutError:
            log.error("did not stop within %.1fs; exiting anyway (the spool is consistent)", grace_s)
    stop_wait.cancel()
    if task.done() and not task.cancelled() and task.exception():
        raise task.exception()  # type: ignore[misc]
