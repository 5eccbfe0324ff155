"""One scheduler per bus: exactly one transaction on the wire at a time, devices multiplexed by due time.

What every bus needs, whatever its protocol: the schedule (each device, or each group of its points, at
its interval — which may shorten in a season or while an alarm on its points is up), one transaction at a
time with the bus's quiet time between them, outputs written ahead of pending polls, backoff when the port
or connection is lost, and device states. The protocol itself is the driver's (device_drivers.drivers).

A device that stops answering goes degraded, then offline. An offline device is probed with growing gaps
(one attempt, no retries), so it cannot eat the bus budget of live ones; at each of its intervals in
between it still produces readings, with quality OFFLINE, so the platform never sees a silent gap.
Pushed devices (a station that sends frames, a sensor that streams lines) are served by the driver's own
loop; their readings go through the same sink.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from device_drivers.base import DeviceError, Driver, TransportError
from gateway.clock import Clock
from gateway.clockcheck import restamp, stamp
from gateway.config import BusConfig, DeviceConfig, PollGroup
from gateway.histogram import TRANSACTION_BOUNDS, Histogram
from gateway.model import Quality, Reading, Value

log = logging.getLogger("yujing.poll")

T = TypeVar("T")
Sink = Callable[[list[Reading]], None]
IntervalPolicy = Callable[[DeviceConfig, float], float]  # (device, configured interval) → interval now


class DeviceState(enum.Enum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


@dataclass
class DevicePoller:
    config: DeviceConfig
    base: int  # catalogue index of the device's first point
    state: DeviceState = DeviceState.ONLINE
    failures: int = 0  # consecutive polls in which nothing answered
    next_probe: float = 0.0  # when an offline device is tried again
    probe_gap: float = 0.0
    polls: int = 0
    last_poll_ms: int | None = None
    # Counted per poll, for gateway.metrics (read when scraped): readings made, the not-good ones by quality
    # code, and polls (or pushed batches) in which nothing answered.
    readings: int = 0
    bad: dict[int, int] = field(default_factory=dict)
    unanswered: int = 0

    def count(self, n: int, bad: list[int]) -> None:
        self.readings += n
        if bad:
            tally = self.bad
            for q in bad:
                tally[q] = tally.get(q, 0) + 1


@dataclass
class _Job:
    poller: DevicePoller
    group: PollGroup
    next_due: float = 0.0


class BusScheduler:
    def __init__(
        self,
        bus: BusConfig,
        devices: list[tuple[DeviceConfig, int]],
        driver: Driver,
        clock: Clock,
        sink: Sink,
        *,
        interval_policy: IntervalPolicy | None = None,
    ) -> None:
        self.bus = bus
        self.driver = driver
        self.clock = clock
        self.sink = sink
        self.interval_policy = interval_policy
        self.pollers = [DevicePoller(d, base) for d, base in devices]
        self._by_name = {p.config.name: p for p in self.pollers}
        self.jobs = [_Job(p, g) for p in self.pollers if driver.polled(p.config) for g in p.config.poll_groups()]
        self.pushed = [p for p in self.pollers if not driver.polled(p.config)]
        self.transactions = 0
        self.latency = Histogram(TRANSACTION_BOUNDS)  # seconds per transaction, real time (gateway.metrics)
        self._last_io = float("-inf")
        self._transport_gap = 0.0
        self._writes: deque[tuple[str, int, int, int | bool, asyncio.Future[None]]] = deque()
        self._write_arrived = asyncio.Event()
        self._in_write = False
        self.busy_since: float | None = None  # start of the transaction on the wire now, if any (liveness clock)
        self.liveness: Callable[[], float] = time.monotonic  # real seconds, whatever clock the schedule runs on
        # A transaction outliving this is a hang (the driver's own timeout should have ended it).
        self.stuck_after_s = 10 * float(getattr(bus.settings, "timeout_s", 1.0)) + 5.0

    def stuck(self) -> str | None:
        """For the watchdog: what is wrong when a transaction has hung, else None."""
        since = self.busy_since
        if since is not None and self.liveness() - since > self.stuck_after_s:
            return f"bus {self.bus.name}: one transaction has taken {self.liveness() - since:.0f} s"
        return None

    # ---------------------------------------------------------- the Link a driver uses

    async def transaction(self, call: Callable[[], Awaitable[T]]) -> T:
        """One exchange on the wire: outputs first, after the quiet time, counted, watched."""
        if self._writes and not self._in_write:
            await self._do_writes()  # an alarm output does not wait for the rest of a poll
        await self._pace()
        try:
            self.transactions += 1
            self.busy_since = began = self.liveness()
            return await call()
        finally:
            self._last_io = self.clock.monotonic()
            self.busy_since = None
            self.latency.observe(self.liveness() - began)

    async def pause(self, seconds: float) -> None:
        await self.clock.sleep(seconds)

    def now_ms(self) -> int:
        return self.clock.time_ms()

    async def _pace(self) -> None:
        # Quiet time between frames: slow RS-485 devices need it, and it is the only place requests meet.
        wait = self._last_io + self.bus.pause_s - self.clock.monotonic()
        if wait > 0:
            await self.clock.sleep(wait)

    # ---------------------------------------------------------- outputs

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
        self._in_write = True
        try:
            while self._writes:
                kind, unit, address, value, done = self._writes.popleft()
                if done.cancelled():
                    continue
                try:
                    await self.driver.write(kind, unit, address, value, self)
                except (DeviceError, TransportError, ValueError) as exc:
                    if not done.done():
                        done.set_exception(exc)
                else:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._in_write = False

    # ---------------------------------------------------------- the schedule

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

    def _interval(self, job: _Job) -> float:
        configured = job.group.interval_s
        if self.interval_policy is None:
            return configured
        try:
            return self.interval_policy(job.poller.config, configured)
        except Exception:  # a policy bug must never stop polling: keep the configured rate
            log.exception("interval policy failed for %s", job.poller.config.name)
            return configured

    async def run(self) -> None:
        """Poll until cancelled. Never returns on device errors; a lost port is reopened with backoff."""
        pushed = asyncio.ensure_future(self.driver.run(self._deliver, self)) if self.pushed else None
        now = self.clock.monotonic()
        queue: list[tuple[float, int]] = []
        for i, job in enumerate(self.jobs):
            job.next_due = now
            heapq.heappush(queue, (now, i))
        try:
            while True:
                due = queue[0][0] if queue else math.inf  # a bus with only outputs (a relay module) just writes
                await self._wait_until(due)
                await self._do_writes()
                if self.clock.monotonic() < due:
                    continue  # woken by a write; the poll is not due yet
                _, i = heapq.heappop(queue)
                job = self.jobs[i]
                await self._poll(job)
                # Fixed-rate schedule; if we fell behind, skip missed slots instead of bursting.
                interval = self._interval(job)
                job.next_due += interval
                now = self.clock.monotonic()
                if job.next_due < now:
                    missed = int((now - job.next_due) // interval) + 1
                    job.next_due += missed * interval
                elif job.next_due > now + interval:  # the interval just shortened (an alarm): do not wait the long one out
                    job.next_due = now + interval
                heapq.heappush(queue, (job.next_due, i))
        finally:
            if pushed is not None:
                pushed.cancel()
                await asyncio.gather(pushed, return_exceptions=True)
            self.driver.close()

    # ---------------------------------------------------------- one poll

    async def _poll(self, job: _Job) -> None:
        p = job.poller
        points = job.group.points
        ts, steps = stamp(self.clock)
        now = self.clock.monotonic()
        if p.state is DeviceState.OFFLINE and now < p.next_probe:
            p.readings += len(points)
            p.bad[Quality.OFFLINE] = p.bad.get(Quality.OFFLINE, 0) + len(points)
            self.sink([Reading(p.base + j, ts, None, Quality.OFFLINE) for j in points])
            return
        p.polls += 1
        attempts = 1 if p.state is DeviceState.OFFLINE else 1 + p.config.retries
        try:
            results, answered = await self.driver.read(p.config, self, attempts, points)
        except TransportError as exc:
            results, answered = [(None, Quality.TRANSPORT)] * len(points), False
            await self._transport_down(exc)
        else:
            self._transport_gap = 0.0
        ts = restamp(self.clock, ts, steps)  # the wall clock stepped during the read: stamp as the new clock says
        p.last_poll_ms = ts
        self._update_state(p, answered, now)
        p.count(len(results), [q for _, q in results if q])
        self.sink([Reading(p.base + j, ts, *r) for j, r in zip(points, results)])

    def _deliver(self, device: str, readings: Sequence[tuple[int, int, Value, int]]) -> None:
        """A pushed device's readings (from the driver's own loop)."""
        p = self._by_name.get(device)
        if p is None or not readings:
            return
        answered = any(q == Quality.GOOD for _, _, _, q in readings)
        p.last_poll_ms = max(ts for _, ts, _, _ in readings)
        self._update_state(p, answered, self.clock.monotonic())
        p.count(len(readings), [q for _, _, _, q in readings if q])
        self.sink([Reading(p.base + j, ts, value, quality) for j, ts, value, quality in readings])

    async def _transport_down(self, exc: TransportError) -> None:
        self._transport_gap = min(max(self._transport_gap * 2, 0.5), 30.0)
        log.warning("%s; retrying in %.1fs", exc, self._transport_gap)
        await self.clock.sleep(self._transport_gap)

    def _update_state(self, p: DevicePoller, answered: bool, now: float) -> None:
        old = p.state
        if answered:
            p.failures = 0
            p.state = DeviceState.ONLINE
            p.probe_gap = 0.0
        else:
            p.failures += 1
            p.unanswered += 1
            if p.failures >= p.config.offline_after:
                p.state = DeviceState.OFFLINE
                # probe less and less often, but never less often than backoff_max_s (or one interval)
                p.probe_gap = min(max(p.probe_gap * 2, p.config.interval_s * 2), max(p.config.backoff_max_s, p.config.interval_s))
                p.next_probe = now + p.probe_gap
            else:
                p.state = DeviceState.DEGRADED
        if p.state is not old:
            level = logging.INFO if p.state is DeviceState.ONLINE else logging.WARNING
            where = f", unit {p.config.unit}" if p.config.unit is not None else ""
            log.log(level, "device %s (bus %s%s) %s -> %s", p.config.name, self.bus.name, where, old.value, p.state.value)


def make_driver(bus: BusConfig, devices: Sequence[DeviceConfig]) -> Any:
    """The bus type's driver (device_drivers.registry)."""
    from device_drivers.registry import kinds

    return kinds()[bus.kind].driver(bus, list(devices))
