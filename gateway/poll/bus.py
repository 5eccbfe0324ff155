"""One scheduler per bus: exactly one transaction on the wire at a time, devices multiplexed by due time.

A device that stops answering goes degraded, then offline. An offline device is probed with growing
gaps (one attempt, no retries), so it cannot eat the bus budget of live ones; at each of its
intervals in between it still produces readings, with quality OFFLINE, so the platform never sees a
silent gap.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import math
import time
from collections import deque
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from device_drivers.modbus import DeviceError, Transport, TransportError
from device_drivers.plan import Request, plan_requests
from device_drivers.registers import Decoder, apply_status_gates, compile_point, status_gates
from gateway.clock import Clock
from gateway.config import BusConfig, DeviceConfig
from gateway.model import Quality, Reading, modbus_exception_quality, quality_name

log = logging.getLogger("yujing.poll")

Sink = Callable[[list[Reading]], None]

# A device answering "illegal address/value" to a coalesced read usually does not map a register in
# the filled gap, or caps the read length: read its points one by one from then on. Other
# exceptions (busy, device failure) are not about the request's shape, so they do not split it.
SPLIT_ON = {modbus_exception_quality(2), modbus_exception_quality(3)}


class DeviceState(enum.Enum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


@dataclass
class DevicePoller:
    config: DeviceConfig
    base: int  # catalogue index of the device's first point
    requests: list[Request]
    state: DeviceState = DeviceState.ONLINE
    failures: int = 0  # consecutive polls in which nothing answered
    next_due: float = 0.0
    next_probe: float = 0.0  # when an offline device is tried again
    probe_gap: float = 0.0
    polls: int = 0
    split: set[int] = field(default_factory=set)  # requests the device rejected whole; read point by point
    decoders: list[Decoder] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    gates: list[tuple[int, tuple[tuple[int, bool], ...]]] = field(default_factory=list)  # points gated by status points

    @classmethod
    def build(cls, config: DeviceConfig, base: int) -> "DevicePoller":
        requests = plan_requests(
            config.points,
            coalesce=config.coalesce,
            max_gap=config.max_gap,
            max_registers=config.max_registers,
            max_bits=config.max_bits,
        )
        return cls(config, base, requests, decoders=[compile_point(p) for p in config.points], counts=[p.count for p in config.points],
                   gates=status_gates(config.points))


class BusScheduler:
    def __init__(
        self,
        bus: BusConfig,
        devices: list[tuple[DeviceConfig, int]],
        transport: Transport,
        clock: Clock,
        sink: Sink,
    ) -> None:
        self.bus = bus
        self.transport = transport
        self.clock = clock
        self.sink = sink
        self.pollers = [DevicePoller.build(d, base) for d, base in devices]
        self.transactions = 0
        self._last_io = float("-inf")
        self._transport_gap = 0.0
        self._writes: deque[tuple[str, int, int, int | bool, asyncio.Future[None]]] = deque()
        self._write_arrived = asyncio.Event()
        self.busy_since: float | None = None  # start of the transaction on the wire now, if any (liveness clock)
        self.liveness: Callable[[], float] = time.monotonic  # real seconds, whatever clock the schedule runs on
        # A transaction outliving this is a hang (the transport's own timeout should have ended it).
        self.stuck_after_s = 10 * bus.settings.timeout_s + 5.0

    def stuck(self) -> str | None:
        """For the watchdog: what is wrong when a transaction has hung, else None."""
        since = self.busy_since
        if since is not None and self.liveness() - since > self.stuck_after_s:
            return f"bus {self.bus.name}: one transaction has taken {self.liveness() - since:.0f} s"
        return None

    async def write(self, kind: str, unit: int, address: int, value: int | bool) -> None:
        """Write one coil ("coil") or holding register ("register") on this bus, ahead of any pending poll.

        It shares the bus's single transaction slot, so it never collides with a poll on the wire.
        Raises DeviceError or TransportError when the device does not take it.
        """
        if kind not in ("coil", "register"):
            raise ValueError(f"bus {self.bus.name}: cannot write a {kind!r}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.append((kind, unit, address, value, done))
        self._write_arrived.set()
        await done

    async def _do_writes(self) -> None:
        while self._writes:
            kind, unit, address, value, done = self._writes.popleft()
            if done.cancelled():
                continue
            try:
                await self._pace()
                self.transactions += 1
                self.busy_since = self.liveness()
                if kind == "coil":
                    await self.transport.write_coil(address, bool(value), unit)
                else:
                    await self.transport.write_register(address, int(value), unit)
            except (DeviceError, TransportError) as exc:
                if not done.done():
                    done.set_exception(exc)
            else:
                if not done.done():
                    done.set_result(None)
            finally:
                self._last_io = self.clock.monotonic()
                self.busy_since = None

    async def _wait_until(self, due: float) -> None:
        """Sleep until `due`, or until a write arrives."""
        if self._writes:
            return
        self._write_arrived.clear()
        if due == math.inf:
            await self._write_arrived.wait()
            return
        delay = due - self.clock.monotonic()
        if delay <= 0:
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waker = asyncio.ensure_future(self._write_arrived.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def run(self) -> None:
        """Poll until cancelled. Never returns on device errors; a lost port is reopened with backoff."""
        now = self.clock.monotonic()
        queue: list[tuple[float, int]] = []
        for i, p in enumerate(self.pollers):
            p.next_due = now
            heapq.heappush(queue, (now, i))
        try:
            while True:
                due = queue[0][0] if queue else math.inf  # a bus with only outputs (a relay module) just writes
                await self._wait_until(due)
                await self._do_writes()
                if self.clock.monotonic() < due:
                    continue  # woken by a write; the poll is not due yet
                _, i = heapq.heappop(queue)
                p = self.pollers[i]
                await self._poll(p)
                # Fixed-rate schedule; if we fell behind, skip missed slots instead of bursting.
                p.next_due += p.config.interval_s
                now = self.clock.monotonic()
                if p.next_due < now:
                    missed = int((now - p.next_due) // p.config.interval_s) + 1
                    p.next_due += missed * p.config.interval_s
                heapq.heappush(queue, (p.next_due, i))
        finally:
            self.transport.close()

    # ---------------------------------------------------------- one device poll

    async def _poll(self, p: DevicePoller) -> None:
        ts = self.clock.time_ms()
        now = self.clock.monotonic()
        points = p.config.points
        if p.state is DeviceState.OFFLINE and now < p.next_probe:
            self.sink([Reading(p.base + j, ts, None, Quality.OFFLINE) for j in range(len(points))])
            return
        p.polls += 1
        results: dict[int, tuple[object, int]] = {}
        answered = False
        attempts = 1 if p.state is DeviceState.OFFLINE else 1 + p.config.retries
        for ri, req in enumerate(p.requests):
            if ri not in p.split:
                quality = await self._read(p, req, results, attempts)
                answered |= quality == Quality.GOOD or bool(quality & Quality.MODBUS_EXCEPTION)
                if not (quality in SPLIT_ON and len(req.members) > 1):
                    continue
                # The device refused a coalesced read (often a hole it does not map): split it for good.
                p.split.add(ri)
                log.warning("%s: %s refused %d registers at %d (%s); reading those points one by one from now on",
                            self.bus.name, p.config.name, req.count, req.address, quality_name(quality))
            for j, _ in req.members:
                single = Request(req.table, points[j].address, points[j].count, ((j, 0),))
                quality = await self._read(p, single, results, attempts)
                answered |= quality == Quality.GOOD or bool(quality & Quality.MODBUS_EXCEPTION)
        self._update_state(p, answered, now)
        if p.gates:
            apply_status_gates(p.gates, results)  # type: ignore[arg-type]
        self.sink([Reading(p.base + j, ts, *results[j]) for j in range(len(points))])

    async def _read(self, p: DevicePoller, req: Request, results: dict[int, tuple[object, int]], attempts: int) -> int:
        """Read one request into results. Returns GOOD, or the quality of the last failure."""
        quality: int = Quality.TIMEOUT
        for attempt in range(attempts):
            if attempt:
                await self.clock.sleep(min(0.05 * 2**attempt, 1.0))  # let a confused slave settle before retrying
            try:
                data = await self._transaction(req, p.config.unit)
            except DeviceError as exc:
                quality = exc.quality
                if quality & Quality.MODBUS_EXCEPTION:
                    break  # a definite answer: retrying would get the same one
                continue
            except TransportError as exc:
                quality = Quality.TRANSPORT
                await self._transport_down(exc)
                break
            self._transport_gap = 0.0
            decoders, counts = p.decoders, p.counts
            for j, off in req.members:
                results[j] = decoders[j](data[off : off + counts[j]])
            return Quality.GOOD
        for j, _ in req.members:
            results[j] = (None, quality)
        return quality

    async def _pace(self) -> None:
        # Quiet time between frames: slow RS-485 devices need it, and it is the only place requests meet.
        wait = self._last_io + self.bus.pause_s - self.clock.monotonic()
        if wait > 0:
            await self.clock.sleep(wait)

    async def _transaction(self, req: Request, unit: int) -> list:
        if self._writes:
            await self._do_writes()  # an alarm output does not wait for the rest of a poll
        await self._pace()
        try:
            self.transactions += 1
            self.busy_since = self.liveness()
            return await self.transport.read(req.table, req.address, req.count, unit)
        finally:
            self._last_io = self.clock.monotonic()
            self.busy_since = None

    async def _transport_down(self, exc: TransportError) -> None:
        self._transport_gap = min(max(self._transport_gap * 2, 0.5), 30.0)
        log.warning("%s: %s; retrying in %.1fs", self.bus.name, exc, self._transport_gap)
        await self.clock.sleep(self._transport_gap)

    def _update_state(self, p: DevicePoller, answered: bool, now: float) -> None:
        old = p.state
        if answered:
            p.failures = 0
            p.state = DeviceState.ONLINE
            p.probe_gap = 0.0
        else:
            p.failures += 1
            if p.failures >= p.config.offline_after:
                p.state = DeviceState.OFFLINE
                # probe less and less often, but never less often than backoff_max_s (or one interval)
                p.probe_gap = min(max(p.probe_gap * 2, p.config.interval_s * 2), max(p.config.backoff_max_s, p.config.interval_s))
                p.next_probe = now + p.probe_gap
            else:
                p.state = DeviceState.DEGRADED
        if p.state is not old:
            level = logging.INFO if p.state is DeviceState.ONLINE else logging.WARNING
            log.log(level, "device %s (bus %s, unit %d) %s -> %s", p.config.name, self.bus.name, p.config.unit, old.value, p.state.value)
