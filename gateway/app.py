"""The wiring: the only module that knows every stage.

    buses ──readings──▶ sink ──▶ storage (own thread) ──▶ spool (SQLite) ──▶ uplink (MQTT) ──▶ broker
    (one scheduler        │              ▲ alarm events (first)                   │ cmd (COSE, verified)
     per bus)             ▼              │                                        ▼
                       alarm desk ───────┴──── outputs (coils via the bus scheduler, GPIO, programs)
                       (rule engine)  ◀── acknowledgements: control socket (`yujing ack`), command inbox

The safety core is the bus schedulers, the alarm desk (rules) and the outputs: the sink calls the desk
before storage, and nothing in the core waits for a disk, a broker or a client. Every other stage — the
uplink with its command inbox, storage, the control socket — runs under the supervisor: an exception is
logged, counted, reported as a gateway_fault alarm event, and the stage restarts with backoff. The core
tasks run under it too, as a net under their promise never to raise. A process that dies or hangs is
systemd's to restart: the watchdog keep-alive is sent only while the core is healthy (gateway.systemd).

Start order: storage (the spool opens synchronously, before the first poll, and never stops the start),
alarm desk, outputs, then pollers, then the uplink. Stop order: pollers first, then the uplink, which
publishes the clean death, then storage, which writes what it still holds. Shutdown is a parameter (an
asyncio.Event), set by SIGTERM/SIGINT in production and by the test or demo that runs the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import __version__
from gateway.clock import Clock, SystemClock
from gateway.clockcheck import (
    ClockWatch,
    StepCursor,
    clock_unset_message,
    place_restored,
    report_step,
)
from gateway.config import BusConfig, Config
from gateway.model import Reading
from gateway.poll.bus import BusScheduler, make_driver
from gateway.spool import Spool
from gateway.uplink.mqtt import Identity, Uplink

from . import storefiles, wire
from .alarms import AlarmDesk, ControlServer
from .command_inbox import CommandInbox
from .commands import Keyring, ReplayStore
from .health import Health
from .rules import AlarmEngine, FileStateStore, RuleStateError
from .storage import Storage
from .supervise import Supervisor
from .systemd import Notifier, Watchdog
from .uplink import base as uplinks

log = logging.getLogger("yujing.gateway")

DriverFactory = Callable[[BusConfig, list[Any]], Any]  # (bus, its devices) → the bus type's driver


class StartupError(Exception):
    """The gateway cannot start at all (its state directory cannot be created); the message says why."""


class DeferredStateStore:
    """The alarm engine's state store, saving on the storage thread (the engine never waits on a disk)."""

    def __init__(self, file: FileStateStore, storage: Storage) -> None:
        self.file = file
        self.storage = storage

    def load(self) -> dict[str, Any]:
        return self.file.load()

    def save(self, state: Any) -> None:
        self.storage.save_state("alarm state", self.file.save, state)


@dataclass
class Gateway:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    driver_factory: DriverFactory = make_driver
    historical_after_s: float = 60.0
    notifier: Notifier = field(default_factory=Notifier)
    # Real time for what is about the real world (the watchdog, restart backoff, stalled disks), whatever
    # clock the polls and rules run on (tests drive that one virtually).
    liveness_clock: Clock = field(default_factory=SystemClock)
    # observable state, for `yujing run` logs, tests and the benchmark
    schedulers: list[BusScheduler] = field(default_factory=list)
    uplink: Uplink | None = None
    storage: Storage | None = None
    session: int = 0
    readings: int = 0
    desk: AlarmDesk | None = None
    outputs: Any = None
    inbox: CommandInbox | None = None
    control: ControlServer | None = None
    health: Health | None = None
    supervisor: Supervisor | None = None
    watchdog: Watchdog | None = None
    tick_s: float | None = 1.0  # None: no time-driven alarm ticks (tests that drive a virtual clock)
    stop_grace_s: float = 3.5  # SIGTERM to exit within 5 s, with the spool closed
    sink_errors: int = 0
    extra_uplinks: list[Any] = field(default_factory=list)  # [[uplinks]]: SL 651 centre, SMS …
    latest: uplinks.LatestValues | None = None  # the newest reading of each point: extra uplinks, the status page
    trends: Any = None  # gateway.status.Trends, while the status page is on
    status_server: Any = None  # gateway.web.server.StatusServer, while the status page is on
    metrics: Any = None  # gateway.metrics.Metrics, built at the first scrape of /metrics (prometheus_client: ~2 MB)
    started_monotonic: float = field(default_factory=time.monotonic)
    _device_points: dict[str, range] = field(default_factory=dict)

    @property
    def spool(self) -> Spool | None:
        """The spool storage holds now (for tests and status; it is replaced if found corrupt)."""
        return self.storage.spool if self.storage is not None else None

    def _sink(self, readings: list[Reading]) -> None:
        """One poll, from a bus scheduler. Never raises: the poll loop must go on whatever happens here."""
        self.readings += len(readings)
        try:
            if self.desk is not None:
                self.desk.on_readings(readings)  # first: a siren never waits for storage
        except Exception as exc:
            self._sink_failed("rules", exc)
        else:
            self._sink_ok("rules")
        try:
            if self.storage is not None:
                self.storage.append(readings)
            if self.latest is not None:
                self.latest.update(readings)
            if self.trends is not None:
                self.trends.update(readings)
        except Exception as exc:
            self._sink_failed("storage", exc)
        else:
            self._sink_ok("storage")

    def _sink_ok(self, what: str) -> None:
        health = self.health
        if health is not None and health.faults and f"stage.{what}" in health.faults:  # (no string built when all is well)
            health.ok(f"stage.{what}", f"{what} takes polls again")

    def _sink_failed(self, what: str, exc: Exception) -> None:
        self.sink_errors += 1
        if self.sink_errors == 1 or self.sink_errors % 1000 == 0:
            log.exception("%s failed on a poll (%d times); polling goes on", what, self.sink_errors)
        if self.health is not None:
            self.health.fault(f"stage.{what}", f"{what} failed on a poll: {type(exc).__name__}: {str(exc)[:200]}")

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        # stamps as before, and notices the wall clock's steps
        watch = self.clock if isinstance(self.clock, ClockWatch) else ClockWatch(self.clock)
        self.clock = watch
        health = self.health = Health(watch)
        if watch.unset:
            health.fault("clock", clock_unset_message(watch.time_ms()))
        supervisor = self.supervisor = Supervisor(self.liveness_clock, health)
        uplink_box: list[Uplink] = []
        storage = self.storage = Storage(
            cfg.spool.path, max_bytes=cfg.spool.max_bytes, liveness=self.liveness_clock.monotonic,
            on_fault=health.fault, on_ok=health.ok, on_stored=lambda: uplink_box[0].wake.set() if uplink_box else None,
            power_cut_window_s=cfg.spool.power_cut_window_s, historical_after_ms=int(self.historical_after_s * 1000),
            batch_max=cfg.uplink.batch_max, clock_ms=self.clock.time_ms,
        )
        storage.bind(asyncio.get_running_loop())
        try:
            started = storage.open(cfg.catalogue, self.clock.time_ms())
        except OSError as exc:
            raise StartupError(f"state directory {cfg.state_dir}: cannot create it: {exc.strerror}; "
                               f"create it for this user or set [spool] path in {cfg.path}") from exc
        self.session = started.session
        for note in started.notes:
            health.note("storage.start", note)
        self.uplink = uplink = Uplink(cfg.uplink, Identity(cfg.site.id, cfg.site.gateway, __version__), storage, self.session,
                                      self.clock, historical_after_s=self.historical_after_s,
                                      on_command_error=lambda exc: health.fault("stage.commands", f"command handling failed: {type(exc).__name__}: {exc}"),
                                      on_command_ok=lambda: health.ok("stage.commands", "a command was handled again"),
                                      on_refused=lambda kind, why: health.fault(f"uplink.refused.{kind}", why),
                                      on_accepted=lambda kind: health.ok(f"uplink.refused.{kind}", f"the broker takes {kind} messages again"))
        uplink_box.append(uplink)
        base = 0
        bases: dict[str, int] = {}
        for d in cfg.devices:
            bases[d.name] = base
            base += len(d.points)
        self._device_points = {d.name: range(bases[d.name], bases[d.name] + len(d.points)) for d in cfg.devices}
        # A bus carries polled devices, or only outputs (a relay module alone on its wire): both need its scheduler.
        used = {d.bus for d in cfg.devices} | {getattr(a, "bus", None) for a in cfg.actions}
        self.schedulers = []
        for bus in cfg.buses:
            if bus.name not in used:
                continue
            mine = [d for d in cfg.devices if d.bus == bus.name]
            self.schedulers.append(BusScheduler(bus, [(d, bases[d.name]) for d in mine], self.driver_factory(bus, mine), self.clock,
                                                self._sink, interval_policy=self._interval))
        fanout = uplinks.EventFanout(storage)
        if cfg.uplinks or cfg.status.host is not None:
            self.latest = uplinks.LatestValues(len(cfg.catalogue))
        if cfg.status.host is not None:
            from .status import Trends

            samples = 240
            self.trends = Trends(len(cfg.catalogue), samples=samples, step_s=cfg.status.trend_hours * 3600 / samples)
        self._start_alarms(fanout, storage, uplink, health)
        if cfg.uplinks:
            assert self.desk is not None
            desk = self.desk
            context = uplinks.UplinkContext(cfg.site.id, cfg.site.gateway, cfg.catalogue, cfg.resolve_point, self.clock, health,
                                            self.latest, fanout, main=uplink,  # type: ignore[arg-type]
                                            rules_on_point=lambda point: desk.engine.rules_reading((point,)))
            self.extra_uplinks = [uplinks.build(c, context) for c in cfg.uplinks]
        log.info("site %s gateway %s: session %d, %d devices, %d points, %d alarm rules, %d actions, spool %s",
                 cfg.site.id, cfg.site.gateway, self.session, len(cfg.devices), len(cfg.catalogue), len(cfg.rules),
                 len(cfg.actions), cfg.spool.path)
        self.watchdog = Watchdog(self.notifier, self.liveness_clock, [*(s.stuck for s in self.schedulers), self._ticking],
                                 status=self._status_line)
        try:
            async with asyncio.TaskGroup() as tg:
                core = [tg.create_task(supervisor.run(f"bus-{s.bus.name}", s.run, core=True), name=f"bus-{s.bus.name}")
                        for s in self.schedulers]
                if self.outputs is not None:
                    core.append(tg.create_task(supervisor.run("outputs", self.outputs.run, core=True), name="outputs"))
                if self.tick_s is not None:
                    core.append(tg.create_task(supervisor.run("alarm-tick", self._ticker, core=True), name="alarm-tick"))
                core.append(tg.create_task(self.watchdog.run(), name="watchdog"))
                helpers = [
                    tg.create_task(supervisor.run("storage", storage.run), name="storage"),
                    tg.create_task(supervisor.run("control", self._serve_control), name="control"),
                    tg.create_task(supervisor.watch({"storage": self._storage_probe}), name="probes"),
                ]
                if cfg.status.host is not None:
                    helpers.append(tg.create_task(supervisor.run("status", self._serve_status), name="status"))
                uplink_stop = asyncio.Event()  # set once the last polls are in the spool
                uplink_task = tg.create_task(supervisor.run("uplink", lambda: uplink.run(uplink_stop)), name="uplink")
                for extra, c in zip(self.extra_uplinks, cfg.uplinks):
                    helpers.append(tg.create_task(supervisor.run(f"uplink-{c.name}", lambda e=extra: e.run(stop)), name=f"uplink-{c.name}"))
                self.notifier.send("READY=1", f"STATUS={self._status_line()}")
                await stop.wait()
                self.notifier.send("STOPPING=1")
                pollers = [t for t in core if t.get_name().startswith("bus-")]
                await stop_tasks(pollers)
                await storage.flush(timeout_s=1.0)
                uplink_stop.set()
                try:
                    # The death goes out and the broker connection closes, or we stop without them: an
                    # unattended gateway must never hang on its way down (the will covers a missed death).
                    await asyncio.wait_for(uplink_task, self.stop_grace_s)
                except TimeoutError:
                    log.warning("uplink did not close within %.1fs; stopping without a clean disconnect", self.stop_grace_s)
                    await stop_tasks([uplink_task])
                await stop_tasks([t for t in core if t not in pollers] + helpers)
        finally:
            if self.control is not None:
                await self.control.close()
            if self.outputs is not None:
                self.outputs.close()
            if self.desk is not None:
                self.desk.engine.save()  # the rate and accumulation windows, up to this moment
            await storage.close()

    def _start_alarms(self, events: uplinks.EventFanout, storage: Storage, uplink: Uplink, health: Health) -> None:
        cfg = self.config
        watch = self.clock
        assert isinstance(watch, ClockWatch)  # run() made it one
        state_file = FileStateStore(cfg.state_dir / "alarms.json")
        store = DeferredStateStore(state_file, storage)
        try:
            engine = AlarmEngine(cfg.rules, cfg.resolve_point, store=store)
        except RuleStateError as exc:
            # An unreadable alarm state must not keep the alarms from running: set it aside, start fresh, say so.
            aside = storefiles.quarantine(state_file.path) if state_file.path.exists() else None
            health.note("storage.alarm_state", f"{exc}; " + (f"moved to {aside.name}; " if aside else "")
                        + "latched alarms and rain/rate windows from before this start are lost: check the site")
            engine = AlarmEngine(cfg.rules, cfg.resolve_point, store=store)
        if watch.unset and place_restored(engine, watch.time_ms()):
            health.note("clock.restored", "the clock is not set: alarm state restored from before this start (rate "
                        "and rain windows, alarm times) is taken as if the gateway had been off for no time")
        desk: AlarmDesk | None = None

        def actuator_event(e: Any) -> None:  # ActuatorEvent → a stored, published alarm event
            if desk is not None:
                desk.actuator_event(wire.Event(e.kind, e.action, 0, 0, e.ts_ms, {}, e.message))

        if cfg.actions:
            from .actions import ActionController

            self.outputs = ActionController(cfg.actions, {s.bus.name: s for s in self.schedulers}, self.clock,
                                            on_event=actuator_event)
        steps = StepCursor(watch)
        desk = self.desk = AlarmDesk(engine, self.clock, session=self.session, events=events, health=health,
                                     outputs=self.outputs, publish_state=uplink.alarm_state,
                                     device_points=self._device_points,
                                     clock_steps=steps.new,
                                     on_clock_step=lambda step: report_step(health, step))
        self.inbox = self._command_inbox(desk, storage, health)
        uplink.commands = self.inbox.handle
        desk.tick()  # publishes the restored state (latched alarms survive restarts)
        self.control = ControlServer(cfg.state_dir / "control.sock", desk, overview=self._overview)

    def _command_inbox(self, desk: AlarmDesk, storage: Storage, health: Health) -> CommandInbox:
        cfg = self.config
        try:
            keys = Keyring.from_files(cfg.uplink.command_public_key_files)
        except ValueError as exc:  # checked with the configuration; changed on disk since
            health.fault("commands", f"{exc}; remote commands are refused until it is fixed")
            keys = Keyring(())
        replay = ReplayStore(cfg.state_dir / "commands.json")
        replay.load()
        if replay.lost:
            health.note("storage.commands", replay.lost)

        async def save_counters(counters: Any) -> None:
            await storage.run_io(replay.save, counters)

        return CommandInbox(keys, replay, site=cfg.site.id, gateway=cfg.site.gateway, clock=self.clock,
                            execute=desk.execute, save_counters=save_counters)

    async def _serve_control(self) -> None:
        assert self.control is not None
        await self.control.start()
        log.info("acknowledge alarms locally with: yujing ack %s RULE --by NAME", self.config.path)
        await asyncio.Event().wait()  # serve until cancelled

    async def _serve_status(self) -> None:
        """The local status page; a port in use or a bad certificate is this stage's fault, not the gateway's."""
        from .web.server import StatusServer

        st = self.config.status
        context = None
        if st.tls_cert_file is not None and st.tls_key_file is not None:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(st.tls_cert_file, st.tls_key_file)
        assert st.host is not None
        self.status_server = StatusServer(self, host=st.host, port=st.port, users_file=st.users_file, ssl_context=context,
                                          metrics=self._scrape)
        await self.status_server.run()

    async def _scrape(self) -> tuple[bytes, str]:
        """Prometheus text for /metrics. The library is loaded when somebody first asks: a gateway nobody
        scrapes does not carry it. Built once, so a restart of the status stage keeps the same registry."""
        if self.metrics is None:
            from .metrics import Metrics

            self.metrics = Metrics(self)
        return await self.metrics.render_async()

    async def _ticker(self) -> None:
        """Time-driven alarm logic (stale inputs, off-delays, season windows) and the state it publishes."""
        assert self.desk is not None and self.tick_s is not None
        while True:
            self.desk.tick()
            await self.clock.sleep(self.tick_s)

    def _interval(self, device: Any, configured: float) -> float:
        """How often to poll a device now: faster in its season, faster while an alarm on its points is up."""
        interval = configured
        season = device.season
        if season is not None and season.window.contains(self.clock.time_ms()):
            interval = min(interval, season.interval_s)
        if device.alarm_interval_s is not None and self.desk is not None:
            if self.desk.device_level(device.name) >= device.alarm_level:
                interval = min(interval, device.alarm_interval_s)
        return interval

    def _ticking(self) -> str | None:
        """For the watchdog: the alarm ticker must have run within the last ten ticks (real seconds)."""
        if self.tick_s is None or self.desk is None or self.desk.last_tick is None:
            return None
        late = time.monotonic() - self.desk.last_tick
        return f"alarm ticks stopped {late:.0f} s ago" if late > 10 * self.tick_s + 5 else None

    def _storage_probe(self) -> str | None:
        assert self.storage is not None
        busy = self.storage.busy_s()
        return f"a disk operation has been running for {busy:.0f} s (disk stalled?)" if busy > 60 else None

    async def _overview(self) -> dict[str, Any]:
        from .status import overview

        return await overview(self)

    def _status_line(self) -> str:
        faults = len(self.health.faults) if self.health else 0
        link = "uplink connected" if self.uplink is not None and self.uplink.connected else "uplink down"
        return f"session {self.session}, {len(self.schedulers)} buses polling, {self.readings} readings, {link}, {faults} faults"


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
