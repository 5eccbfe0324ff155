"""The wiring: the only module that knows every stage.

    buses ──readings──▶ sink ──▶ spool (SQLite, durable) ──▶ uplink (MQTT) ──▶ broker
    (one scheduler        │              ▲ alarm events (first)        │ cmd (signed)
     per bus)             ▼              │                             ▼
                       alarm desk ───────┴──── outputs (coils via the bus scheduler, GPIO, programs)
                       (rule engine)  ◀── acknowledgements: control socket (`yujing ack`), MQTT cmd

Start order: spool, alarm desk, uplink, then pollers. Stop order: pollers first, then the uplink, which
publishes the clean death. Shutdown is a parameter (an asyncio.Event), set by SIGTERM/SIGINT in
production and by the test or demo that runs the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_drivers.modbus import ModbusTransport, Transport
from gateway import __version__
from gateway.clock import Clock, SystemClock
from gateway.config import BusConfig, Config
from gateway.model import Reading
from gateway.poll.bus import BusScheduler
from gateway.spool import Spool, SpoolError
from gateway.uplink.mqtt import Identity, Uplink

from . import wire
from .alarms import AlarmDesk, ControlServer
from .rules import AlarmEngine, FileStateStore

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
    desk: AlarmDesk | None = None
    outputs: Any = None
    tick_s: float | None = 1.0  # None: no time-driven alarm ticks (tests that drive a virtual clock)
    stop_grace_s: float = 3.5  # SIGTERM to exit within 5 s, with the spool closed

    def _sink(self, readings: list[Reading]) -> None:
        self.readings += len(readings)
        if self.desk is not None:
            self.desk.on_readings(readings)  # before the spool: a full disk must not delay a siren
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
        # A bus carries polled devices, or only outputs (a relay module alone on its wire): both need its scheduler.
        used = {d.bus for d in cfg.devices} | {getattr(a, "bus", None) for a in cfg.actions}
        self.schedulers = [
            BusScheduler(bus, [(d, bases[d.name]) for d in cfg.devices if d.bus == bus.name], self.transport_factory(bus), self.clock, self._sink)
            for bus in cfg.buses
            if bus.name in used
        ]
        control: ControlServer | None = None
        if cfg.rules:
            control = await self._start_alarms(self.spool, self.uplink)
        try:
            async with asyncio.TaskGroup() as tg:
                uplink_task = tg.create_task(self.uplink.run(stop), name="uplink")
                helpers = []
                if self.outputs is not None:
                    helpers.append(tg.create_task(self.outputs.run(), name="outputs"))
                if self.desk is not None and self.tick_s is not None:
                    helpers.append(tg.create_task(self._ticker(self.desk, self.tick_s), name="alarm-tick"))
                pollers = [tg.create_task(s.run(), name=f"bus-{s.bus.name}") for s in self.schedulers]
                await stop.wait()
                await stop_tasks(pollers)
                try:
                    # The death goes out and the broker connection closes, or we stop without them: an
                    # unattended gateway must never hang on its way down (the will covers a missed death).
                    await asyncio.wait_for(uplink_task, self.stop_grace_s)
                except TimeoutError:
                    log.warning("uplink did not close within %.1fs; stopping without a clean disconnect", self.stop_grace_s)
                await stop_tasks(helpers)
        finally:
            if control is not None:
                await control.close()
            if self.outputs is not None:
                self.outputs.close()
            self.spool.close()

    async def _start_alarms(self, spool: Spool, uplink: Uplink) -> ControlServer:
        cfg = self.config
        engine = AlarmEngine(cfg.rules, cfg.resolve_point, store=FileStateStore(cfg.state_dir / "alarms.json"))
        desk: AlarmDesk | None = None

        def actuator_event(e: Any) -> None:  # ActuatorEvent → a spooled, published alarm event
            if desk is not None:
                desk.actuator_event(wire.Event(e.kind, e.action, 0, 0, e.ts_ms, {}, e.message))

        if cfg.actions:
            from .actions import ActionController

            self.outputs = ActionController(cfg.actions, {s.bus.name: s for s in self.schedulers}, self.clock,
                                            on_event=actuator_event)
        key = cfg.uplink.command_key_file.read_bytes().strip() if cfg.uplink.command_key_file else None
        desk = self.desk = AlarmDesk(engine, self.clock, session=self.session, spool=spool, outputs=self.outputs,
                                     publish_state=uplink.alarm_state, wake_uplink=uplink.wake.set, command_key=key)
        uplink.commands = desk.handle_command
        desk.tick()  # publishes the restored state (latched alarms survive restarts)
        control = ControlServer(cfg.state_dir / "control.sock", desk)
        await control.start()
        log.info("%d alarm rules, %d actions; acknowledge locally with: yujing ack %s RULE --by NAME",
                 len(cfg.rules), len(cfg.actions), cfg.path)
        return control

    async def _ticker(self, desk: AlarmDesk, every_s: float) -> None:
        """Time-driven alarm logic (stale inputs, off-delays, season windows) and held events."""
        while True:
            await self.clock.sleep(every_s)
            desk.tick()


async def stop_tasks(tasks: list[asyncio.Task[Any]], *, retry_s: float = 0.5) -> None:
    """Cancel tasks and wait for them, cancelling again any that lost a cancellation on the way.

    CPython 3.11's asyncio.wait_for can swallow a cancellation that races its timeout (gh-86296); a
    library waiting that way inside a task would otherwise keep a stopping gateway alive forever.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)


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
